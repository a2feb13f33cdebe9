"""The one benchmark harness every bench/ script uses.

- :func:`measure` times a callable: ``triton.testing.do_bench`` on the GPU, a perf-counter loop on
  the CPU; median with p20/p80 in milliseconds.
- :func:`extra_peak_bytes` is the peak memory a call allocates beyond what was live before it
  (CUDA allocator statistics on the GPU; the profiler's allocation events on the CPU).
- :class:`Report` collects rows (providers side by side, with derived GB/s, TFLOP/s, ratios and
  the fraction of the hardware limit), prints a table last and writes JSON with the device name,
  the torch/Triton versions and the commit.

Benchmarks are never tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3, rep: int = 10, min_time_s: float = 0.0
) -> tuple[float, float, float]:
    """(median, p20, p80) of ``fn``'s run time in milliseconds."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=max(25, warmup), rep=max(100, rep), quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    for _ in range(warmup):
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < rep or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


def quantiles(ms: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of ``ms`` (nan for none); the quantiles are the nearest ranks."""
    xs = sorted(ms)
    if not xs:
        return math.nan, math.nan, math.nan

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))]

    return statistics.median(xs), q(0.2), q(0.8)


def extra_peak_bytes(
    fn: Callable[[], object], device: torch.device | str, setup: Callable[[], object] | None = None
) -> int:
    """Peak bytes allocated during ``fn`` beyond what was allocated when it started.

    GPU: the CUDA allocator's statistics. CPU: the profiler's allocation events; the profiler
    cannot see the release of memory allocated before profiling began, so ``setup`` (run inside
    the profiled region, before ``fn``) must (re)create whatever ``fn`` replaces or frees, e.g.
    fresh copies of parameters that an out-of-place update swaps for new tensors.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if setup is not None:
            setup()
        with record_function("__extra_peak_bytes__"):
            fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mark = next(e for e in events if e.get("name") == "__extra_peak_bytes__")
    t0, t1 = mark["ts"], mark["ts"] + mark.get("dur", 0)
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    # "Total Allocated" is the allocator's running total since the first profiled allocation, and it
    # drifts: a block allocated in an earlier profiled window but freed outside any is never
    # subtracted. So the base is the total just before the window, read from the window's first
    # event when no event precedes it (its total minus its own "Bytes"), never 0.
    base = None
    peak = 0
    for e in memory:
        total = e["args"].get("Total Allocated", 0)
        if e["ts"] < t0:
            base = total
        elif e["ts"] <= t1:
            if base is None:
                base = total - e["args"].get("Bytes", 0)
            peak = max(peak, total - base)
    return int(peak)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


def device_slug(device: torch.device | str) -> str:
    """Short file-name stem for results: 'cpu', 'h200', 'h100', ..."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key in ("h200", "h100", "a100", "l40s", "l4", "a10g", "rtx"):
        if key in name:
            return key
    return "cuda"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device | str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@dataclass
class Row:
    bench: str
    case: str
    provider: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    metrics: dict = field(default_factory=dict)


class Report:
    """Rows of one benchmark run: printed as a table, written as JSON."""

    def __init__(self, bench: str, device: torch.device | str):
        self.bench = bench
        self.device = torch.device(device)
        self.rows: list[Row] = []

    def add(self, case: str, provider: str, times: tuple[float, float, float], **metrics) -> Row:
        row = Row(self.bench, case, provider, *times, metrics=metrics)
        self.rows.append(row)
        return row

    def table(self) -> str:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r.metrics if k not in keys]
        header = ["case", "provider", "median ms", "p20", "p80", *keys]
        lines = [header]
        for r in self.rows:
            cells = [r.case, r.provider, f"{r.median_ms:.3f}", f"{r.p20_ms:.3f}", f"{r.p80_ms:.3f}"]
            cells += [_fmt(r.metrics.get(k)) for k in keys]
            lines.append(cells)
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
        out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(out)

    def to_json(self) -> dict:
        return {"bench": self.bench, "environment": environment(self.device), "rows": [asdict(r) for r in self.rows]}

    def finish(self, out: str | None = None) -> None:
        """Print the table (last) and write the JSON rows to ``out`` when given."""
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
            with open(out, "w") as f:
                json.dump(self.to_json(), f, indent=1)
        env = environment(self.device)
        print(
            f"\n## {self.bench} on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
            f"commit {env['commit']})"
        )
        print(self.table())


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    p.add_argument("--json", default=None, help="write the rows here (default: print only)")
    return p
