"""The demo's text: the Python standard library's own sources, read at run time.

Every machine with Python has them, so nothing is downloaded and nothing is copied into the repo.
The split is deterministic, by SHA-256 of names (never by file order or by Python's randomised
``hash``):

- a top-level module or package whose name hashes into the lowest ``FINETUNE_PERMILLE`` of 1000
  buckets goes, whole, to the **fine-tuning** part; everything else to **pre-training**. Whole
  packages move together, so fine-tuning meets code (``email``, ``asyncio``, ...) the pre-trained
  model has never seen: a small, honest domain shift;
- within the fine-tuning part, a module (full dotted name) hashing into the lowest
  ``HELDOUT_PERMILLE`` buckets (another salt) is **held out**; the rest is fine-tuning **train**.

Tests (``test``, ``tests``, ``idle_test``) and installed packages (``site-packages``) are skipped.
Each file is capped at ``FILE_CAP`` bytes and each part at a byte budget, filled in hash order,
so that a cap takes a pseudo-random sample of modules rather than the alphabetically first ones.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FINETUNE_PERMILLE = 150
HELDOUT_PERMILLE = 250
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
SEPARATOR = b"\n\n"
FILE_CAP = 64 << 10  # bytes per file, so that no one file (pydoc_data's topics: 0.7 MB of prose) dominates a part


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def bucket(name: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:8], "little") % 1000


def list_modules(root: str) -> list[tuple[str, str]]:
    """(dotted module name, path) of every .py file under ``root``, sorted by name."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, ".") + "."
        for f in filenames:
            if f.endswith(".py"):
                out.append((prefix + f[:-3], os.path.join(dirpath, f)))
    return sorted(out)


def split_of(module: str) -> str:
    """``pretrain``, ``train`` or ``heldout`` for a dotted module name."""
    if bucket(module.split(".")[0], "finetune") >= FINETUNE_PERMILLE:
        return "pretrain"
    return "heldout" if bucket(module, "heldout") < HELDOUT_PERMILLE else "train"


@dataclass
class Corpus:
    """Bytes of each part, the modules in it, and a fingerprint of all of it (for cache keys)."""

    text: dict[str, bytes]
    modules: dict[str, list[str]]
    fingerprint: str
    root: str = ""
    meta: dict = field(default_factory=dict)


def load_corpus(root: str | None = None, max_bytes: dict[str, int] | None = None) -> Corpus:
    """Read and split the sources under ``root`` (default: this interpreter's standard library)."""
    root = root or stdlib_root()
    caps = {"pretrain": 8 << 20, "train": 2 << 20, "heldout": 256 << 10, **(max_bytes or {})}
    mods = list_modules(root)
    if not mods:
        raise RuntimeError(f"no .py files under {root!r}: the demo needs the Python standard library sources")
    by_split: dict[str, list[tuple[int, str, str]]] = {"pretrain": [], "train": [], "heldout": []}
    for name, path in mods:
        by_split[split_of(name)].append((bucket(name, "order"), name, path))
    text, modules = {}, {}
    digest = hashlib.sha256()
    for split, items in by_split.items():
        chunks, names, size = [], [], 0
        for _, name, path in sorted(items):
            if size >= caps[split]:
                break
            with open(path, "rb") as f:
                data = f.read()
            data = data[: min(FILE_CAP, caps[split] - size)]
            chunks.append(data)
            names.append(name)
            size += len(data) + len(SEPARATOR)
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        if not chunks:
            raise RuntimeError(f"the {split!r} part of {root!r} is empty; too few modules for the split")
        text[split] = SEPARATOR.join(chunks)
        modules[split] = names
    meta = {
        "python": sys.version.split()[0],
        "bytes": {k: len(v) for k, v in text.items()},
        "modules": {k: len(v) for k, v in modules.items()},
    }
    return Corpus(text, modules, digest.hexdigest()[:16], root, meta)


def byte_tokens(data: bytes) -> torch.Tensor:
    """Byte-level tokens (vocab 256): the bytes themselves, as uint8 (cast per batch)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def hf_tokens(tokenizer) -> Callable[[bytes], torch.Tensor]:
    """A tokenizer function for a Hugging Face tokenizer (text decoded as UTF-8)."""

    def encode(data: bytes) -> torch.Tensor:
        ids = tokenizer(data.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.int64)

    return encode


class Batches:
    """Windows of ``seq_len + 1`` tokens of one token stream, ``(B, seq_len + 1)`` int64.

    ``train(step)`` depends on (seed, step) only, so every optimizer sees the same minibatch at the
    same step whatever it did before; ``heldout(n)`` is a fixed set of evenly spaced windows.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0):
        if tokens.numel() < seq_len + 2:
            raise ValueError(f"{tokens.numel()} tokens: too few for windows of {seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed

    def _windows(self, starts: torch.Tensor, device) -> torch.Tensor:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        return self.tokens[idx].to(device=device, dtype=torch.int64)

    def train(self, step: int, device="cpu") -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.batch_size,), generator=g)
        return self._windows(starts, device)

    def heldout(self, n_batches: int, device="cpu") -> list[torch.Tensor]:
        n = n_batches * self.batch_size
        last = self.tokens.numel() - self.seq_len - 1
        starts = torch.linspace(0, last, n).long() if n > 1 else torch.zeros(1, dtype=torch.long)
        return [self._windows(s, device) for s in starts.split(self.batch_size)]
