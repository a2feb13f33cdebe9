"""The main job: ``python -m lorenza.demo`` (see ``__main__``) and its parts.

- :mod:`.model`: a small Llama-style causal LM over bytes;
- :mod:`.data`: the standard library's sources, split deterministically;
- :mod:`.optimizers`: the one registry of the optimizers compared (imports ``lorenza.optim`` lazily);
- :mod:`.train`: cached pre-training and one fine-tune with its measurements;
- :mod:`.memory`, :mod:`.report`: memory accounting; table, JSON, PNG.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict:
    from .__main__ import main as _main

    return _main(argv)
