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
    """``update(n, desc, loss)``: tqdm when installed and stderr is a terminal, else a line every 5%.

    ``total`` and ``n`` are in any unit of work; the demo uses estimated seconds (each optimizer's
    step weighted by its measured cost), so the percentage and the time left are honest when the
    optimizers differ tenfold in cost. The time left is ``elapsed / done * (total - done)``.
    """

    def __init__(self, total: float, desc: str = "", enabled: bool = True):
        self.total, self.n, self.enabled = max(1e-9, float(total)), 0.0, enabled
        self._bar = None
        self._next = 0.0
        self._t0 = time.perf_counter()
        if enabled and sys.stderr.isatty():  # tqdm's carriage returns make a mess of logs: lines there
            try:
                from tqdm.auto import tqdm

                fmt = "{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"
                self._bar = tqdm(total=self.total, desc=desc, dynamic_ncols=True, leave=True, bar_format=fmt)
            except ImportError:
                pass

    def left(self) -> float:
        """Estimated seconds left (nan before any work is done)."""
        elapsed = time.perf_counter() - self._t0
        return elapsed / self.n * (self.total - self.n) if self.n > 0 else math.nan

    def update(self, n: float, desc: str | None, loss: float | None) -> None:
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
        if self.n / self.total >= self._next or self.n >= self.total:
            self._next = self.n / self.total + 0.05
            extra = f" loss {loss:.4f}" if loss is not None else ""
            left = self.left()
            eta = f", ~{left:.0f}s left" if math.isfinite(left) else ""
            print(
                f"[{min(100.0, 100 * self.n / self.total):5.1f}% {time.perf_counter() - self._t0:6.1f}s{eta}] "
                f"{desc}{extra}",
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


#: Line styles and markers cycled at different periods than the 10 colours: curves that coincide
#: (AdamW and AdaZoSAM at rho small, Lorenza and Lorenza+, MeZO and MeZO-Adam) stay distinguishable.
_LINESTYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "v", "D", "x", "+", "*", "P", "X"]


def line_styles(names: list[str]) -> dict[str, dict]:
    """A distinct (colour, line style, marker) for each name, in order."""
    out = {}
    for i, name in enumerate(names):
        out[name] = {
            "color": f"C{i % 10}",
            "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
            "marker": _MARKERS[i % len(_MARKERS)],
            "markersize": 4 + (i % 3),
            "markerfacecolor": "none" if i % 2 else None,
            "linewidth": 1.2 + 0.6 * ((i // 4) % 2),
        }
    return out


def warmup_bump(curves: dict[str, list], initial: float, names: list[str]) -> float:
    """The largest rise of the held-out loss above the pre-trained loss among ``names`` (0 if none)."""
    rises = [v - initial for n in names for _, v in curves.get(n, [])]
    return max([0.0, *rises])


def plot_curves(
    path: str,
    curves: dict[str, list],
    costs: dict[str, int],
    title: str,
    initial: float | None = None,
    zeroth_order: set[str] | frozenset[str] = frozenset(),
) -> str | None:
    """Held-out loss against steps and against forward-pass equivalents (top); below, the
    improvement over the pre-trained loss of the gradient-taking and of the zeroth-order
    optimizers, each on its own scale (the zeroth-order ones move a hundred times less in the
    same steps and look flat on the shared axis). None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n, c in curves.items() if c]
    styles = line_styles(names)
    rows = 2 if initial is not None else 1
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.5 * rows), squeeze=False)
    for name in names:
        steps = [s for s, _ in curves[name]]
        losses = [v for _, v in curves[name]]
        axes[0][0].plot(steps, losses, label=name, **styles[name])
        axes[0][1].plot([s * costs.get(name, 1) for s in steps], losses, label=name, **styles[name])
        if initial is not None:
            ax = axes[1][1] if name in zeroth_order else axes[1][0]
            ax.plot(steps, [initial - v for v in losses], label=name, **styles[name])
    axes[0][0].set_xlabel("step")
    axes[0][1].set_xlabel("forward-pass equivalents (a backward pass = 2 forwards)")
    axes[0][0].set_ylabel("held-out loss (nats/token)")
    axes[0][1].sharey(axes[0][0])
    if initial is not None:
        axes[1][0].set_title("gradient-taking optimizers", fontsize=9)
        axes[1][1].set_title("zeroth-order optimizers (own scale)", fontsize=9)
        for ax in axes[1]:
            ax.set_xlabel("step")
            ax.set_ylabel("improvement over the pre-trained loss (nats)")
            ax.axhline(0.0, color="0.5", linewidth=0.8)
            if ax.lines:
                ax.legend(fontsize=8)
    for ax in (a for row in axes for a in row):
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
