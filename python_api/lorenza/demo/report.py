"""The demo's output: a progress bar, one table, the rows as JSON and a PNG of the loss curves.

tqdm and matplotlib are optional: without tqdm the bar is a plain line every few percent; without
matplotlib the PNG is skipped, and the run says so.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

COLUMNS = [
    ("optimizer", "optimizer", "{}"),
    ("steps", "steps", "{}"),
    ("heldout_loss", "held-out loss", "{:.4f}"),
    ("perplexity", "ppl", "{:.2f}"),
    ("state_mb", "opt state MB", "{:.3f}"),
    ("peak_mb", "peak MB", "{:.2f}"),
    ("s_per_step", "s/step", "{:.4f}"),
    ("fwd_per_step", "fwd/step", "{:.2g}"),
    ("bwd_per_step", "bwd/step", "{:.2g}"),
]


class Progress:
    """``update(n, desc, loss)``: tqdm when installed and stderr is a terminal, else a line every 5%."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True):
        self.total, self.n, self.enabled = max(1, total), 0, enabled
        self._bar = None
        self._next = 0.0
        self._t0 = time.perf_counter()
        if enabled and sys.stderr.isatty():  # tqdm's carriage returns make a mess of logs: lines there
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)
            except ImportError:
                pass

    def update(self, n: int, desc: str | None, loss: float | None) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            if desc:
                self._bar.set_description(desc, refresh=False)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self._bar.update(n)
            return
        if self.n / self.total >= self._next or self.n == self.total:
            self._next = self.n / self.total + 0.05
            extra = f" loss {loss:.4f}" if loss is not None else ""
            print(
                f"[{100 * self.n / self.total:5.1f}% {time.perf_counter() - self._t0:6.1f}s] {desc}{extra}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def table(rows: list[dict]) -> str:
    """A markdown table of the rows (one per optimizer), failed runs marked."""
    lines = [[title for _, title, _ in COLUMNS]]
    for r in rows:
        cells = [_cell(r.get(key), fmt) for key, _, fmt in COLUMNS]
        if r.get("error"):
            cells[0] += " (failed)"
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    out = [
        "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) + " |"
        for line in lines
    ]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=float)


def plot_curves(path: str, curves: dict[str, list], costs: dict[str, int], title: str) -> str | None:
    """Held-out loss against steps and against forward-pass equivalents; None when no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, curve in curves.items():
        if not curve:
            continue
        steps = [s for s, _ in curve]
        losses = [v for _, v in curve]
        axes[0].plot(steps, losses, marker=".", label=name)
        axes[1].plot([s * costs.get(name, 1) for s in steps], losses, marker=".", label=name)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("forward-pass equivalents (a backward pass = 2 forwards)")
    axes[0].set_ylabel("held-out loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
