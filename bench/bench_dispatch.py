"""What a call costs between the public API and the kernel, and how many calls a step makes.

Three parts, side by side with torch's own ops in the same run:

  ops           per-call time (microseconds) of each public ``lorenza_kernels`` op on tiny inputs
                (10-element tensors, 8 x 4 matrices), lists of 1 and 200 tensors, next to the
                backend's implementation called directly (no dispatch, no validation), the raw
                ``_C`` kernel where there is one, and ``torch._foreach_add_`` on the same list
                (``torch.randn`` for ``gaussian``). ``x foreach``: public / foreach.
  first call    a fresh process: ``import lorenza_kernels`` and its first op call, in seconds,
                and whether that imported ``torch._dynamo`` (the price of torch.compile's machinery)
  steps         per optimizer of the demo's registry, on the demo's Llama-style model with 8 and
                32 layers: ``lorenza_kernels`` op calls per step made by the optimizer (torch
                profiler events outside the closure; ``probe_calls``: those inside it, where exact
                probes perturb each parameter as the forward pass reads it), the
                step's time minus its closure evaluations (median over steps, the first steps and
                any subspace refresh excluded), next to ``torch.optim.AdamW(foreach=True).step()``
                on the same parameters and gradients (``x AdamW``); ``lk_ms``: the part of a
                (profiled) step spent inside ``lorenza_kernels`` ops

  python bench/bench_dispatch.py [--quick] [--device cpu|cuda] [--json out.json] [--part ops,first,steps]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common

try:
    import lorenza.demo  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(ROOT, "python_api"))

import lorenza_kernels as lk
from lorenza_kernels import _checks, _ext, _registry

NS = "lorenza_kernels::"


def per_call_us(fn, device, *, inner: int, samples: int) -> tuple[float, float, float]:
    """(median, p20, p80) microseconds per call: ``samples`` timings of ``inner`` calls each."""

    def batch():
        for _ in range(inner):
            fn()

    med, p20, p80 = common.measure(batch, device, warmup=2, rep=samples)
    return med * 1e3 / inner, p20 * 1e3 / inner, p80 * 1e3 / inner


# --- part 1: per-call cost of the ops --------------------------------------------------------------


def _raw_axpby(ts, seed, streams, alpha, beta):
    """The C++ kernel with its argument lists prepared once (CPU only)."""
    ptrs, numels = [t.data_ptr() for t in ts], [t.numel() for t in ts]
    codes, ncols = [lk._dtypes.CODES[t.dtype] for t in ts], [1] * len(ts)
    norms = torch.empty(len(ts))
    args = (ptrs, numels, codes, ncols, _checks.seed_from_int64(seed), streams, alpha, beta,
            [0] * len(ts), [0.0] * len(ts), norms.data_ptr(), torch.get_num_threads())  # fmt: skip
    return lambda: _ext._C.seeded_axpby_cpu(*args) or norms  # the closure keeps `norms` alive


def op_rows(report: common.Report, device: str, quick: bool) -> None:
    inner, samples = (50, 7) if quick else (200, 15)
    dev = torch.device(device)

    def impl(op):
        return _registry.implementation(op, _registry.active(op, dev.type), dev.type)

    def add(case, public, backend, foreach, raw=None, foreach_name="foreach_add_"):
        t_pub = per_call_us(public, device, inner=inner, samples=samples)
        t_back = per_call_us(backend, device, inner=inner, samples=samples)
        t_base = per_call_us(foreach, device, inner=inner, samples=samples)
        t_raw = per_call_us(raw, device, inner=inner, samples=samples) if raw is not None else None
        ms = tuple(x / 1e3 for x in t_pub)
        report.add(
            case, "public", ms, us=t_pub[0], backend_us=t_back[0], raw_us=t_raw and t_raw[0],
            baseline=foreach_name, baseline_us=t_base[0], x_baseline=t_pub[0] / t_base[0],
            x_backend=t_pub[0] / t_back[0],
        )  # fmt: skip

    for count in (1, 200):
        ts = [torch.zeros(10, device=dev) for _ in range(count)]
        streams, ones = list(range(count)), [1.0] * count
        seed64 = _checks.seed_to_int64(5)
        be = impl("seeded_axpby_")
        raw = _raw_axpby(ts, seed64, streams, ones, ones) if dev.type == "cpu" and _ext.has_cpu_kernels() else None
        add(
            f"seeded_axpby_ x{count}", lambda: lk.seeded_axpby_(ts, 5, 1.0),
            lambda: be(ts, seed64, streams, ones, ones), lambda: torch._foreach_add_(ts, 1.0), raw,
        )  # fmt: skip
        bc = impl("seeded_colsum")
        add(
            f"seeded_colsum x{count}", lambda: lk.seeded_colsum(ts, 5),
            lambda: bc(ts, seed64, streams), lambda: torch._foreach_add_(ts, 1.0),
        )  # fmt: skip
    out = torch.empty(2, 4, device=dev)
    be = impl("seeded_axpby_")
    add(
        "gaussian (2, 4)", lambda: lk.gaussian((2, 4), 1, device=dev), lambda: be([out], 1, [0], [1.0], [0.0]),
        lambda: torch.randn(2, 4, device=dev), foreach_name="randn",
    )  # fmt: skip
    for count in (1, 200):
        W = [torch.zeros(8, 4, device=dev) for _ in range(count)]
        G = [torch.randn(8, 4, device=dev) for _ in range(count)]
        Q = [torch.linalg.qr(torch.randn(4, 2, device=dev))[0] for _ in range(count)]
        M = [torch.zeros(8, 2, device=dev) for _ in range(count)]
        V = [torch.zeros(8, 2, device=dev) for _ in range(count)]
        bp = impl("projected_adam_step_")
        hyper = (1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0, "right", 0.0)
        add(
            f"projected_adam_step_batched_ 8x4 r2 x{count}",
            lambda: lk.projected_adam_step_batched_(W, G, Q, M, V, step=1, lr=1e-3, side="right"),
            lambda: bp(W, G, Q, M, V, [1] * count, *hyper), lambda: torch._foreach_add_(W, 1.0),
        )  # fmt: skip
    Ms, Vs, Qo = M[:1], V[:1], Q[:1]
    bm = impl("moment_transform_")
    add(
        "moment_transform_ 8x2 x1", lambda: lk.moment_transform_(Ms, Vs, Qo, Qo, side="right"),
        lambda: bm(Ms, Vs, Qo, Qo, "right", "rotate"), lambda: torch._foreach_add_(Ms, 1.0),
    )  # fmt: skip
    # The floor of any op whose kernel is Python: torch's dispatcher calling a kernel that returns
    # at once, with seeded_axpby_'s schema and arguments.
    floor_op = _floor_op()
    ts1, out1 = [torch.zeros(10, device=dev)], torch.empty(1, device=dev)
    add(
        "dispatcher floor (empty Python kernel) x1", lambda: floor_op(ts1, 5, [0], [1.0], [1.0], None, None),
        lambda: out1, lambda: torch._foreach_add_(ts1, 1.0),
    )  # fmt: skip
    A = torch.randn(16, 8, device=dev)
    br = impl("randomized_range")
    add(
        "randomized_range 16x8 r2", lambda: lk.randomized_range(A, 2, side="right"),
        lambda: br(A[None], 2, 8, 1, 0, [0]), lambda: torch._foreach_add_([A], 1.0),
    )  # fmt: skip


_FLOOR: dict = {}


def _floor_op():
    if not _FLOOR:
        lib = torch.library.Library("lorenza_bench_floor", "DEF")
        lib.define("noop_" + lk._ops.SCHEMAS["seeded_axpby_"][0])
        out = torch.empty(1)
        lib.impl("noop_", lambda *args: out, "CompositeExplicitAutograd")
        _FLOOR.update(lib=lib, op=torch.ops.lorenza_bench_floor.noop_.default)
    return _FLOOR["op"]


# --- part 2: the first call in a fresh process ------------------------------------------------------

FIRST_CALL = """
import json, sys, time
import torch
before = set(sys.modules)
t0 = time.perf_counter()
import lorenza_kernels as lk
t1 = time.perf_counter()
lk.seeded_axpby_([torch.zeros(10, device=sys.argv[1])], 1, 1.0)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_call_s": t2 - t1, "dynamo": "torch._dynamo" in sys.modules,
                  "new_modules": len(set(sys.modules) - before)}))
"""


def first_call_rows(report: common.Report, device: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python_api")])}
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", FIRST_CALL, device], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["first_call_s"])
    s = best["first_call_s"] * 1e3
    report.add(
        "first call in a fresh process", "public", (s, s, s), import_s=min(r["import_s"] for r in runs),
        first_call_s=best["first_call_s"], imports_dynamo=any(r["dynamo"] for r in runs),
        new_modules=best["new_modules"],
    )  # fmt: skip


# --- part 3: op calls and optimizer time per step ---------------------------------------------------


def _model(layers: int, device: str, quick: bool):
    from lorenza.demo.model import LlamaLM, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(dim=64 if quick else 128, n_layers=layers, n_heads=4, max_seq_len=16)
    model = LlamaLM(cfg).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), device=device)
    return model, tokens


class TimedClosure:
    """The closure protocol, timing its own evaluations so they can be subtracted from the step."""

    def __init__(self, model, tokens, device):
        from lorenza.demo.model import lm_loss

        self.fn = lambda: lm_loss(model, tokens)
        self.device, self.seconds = device, 0.0
        self.marked = False  # inside a profiler range "closure" (forward and backward alike)

    def __call__(self):
        if not self.marked:
            return self._run()
        from torch.profiler import record_function

        with record_function("closure"):
            return self._run()

    def _run(self):
        common.sync(self.device)
        t0 = time.perf_counter()
        loss = self.fn()
        if torch.is_grad_enabled():
            loss.backward()
        common.sync(self.device)
        self.seconds += time.perf_counter() - t0
        return loss.detach()


def _optimizer_ms(opt, closure: TimedClosure, steps: int, device: str) -> list[float]:
    out = []
    for _ in range(steps):
        closure.seconds = 0.0
        opt.zero_grad(set_to_none=True)
        common.sync(device)
        t0 = time.perf_counter()
        opt.step(closure)
        common.sync(device)
        out.append((time.perf_counter() - t0 - closure.seconds) * 1e3)
    return out


def _op_calls(opt, closure) -> tuple[int, int, float]:
    """``lorenza_kernels`` op calls of one step made by the optimizer itself (outside the closure),
    those made inside the closure (exact probes perturb each parameter where it is read), and the
    milliseconds of the step spent inside the optimizer's ops (profiled)."""
    from torch.profiler import ProfilerActivity, profile

    # The range covers the backward pass too: an exact probe's ascent regenerates its perturbed
    # weights there, and those calls are the closure's (one per read), not the optimizer's.
    closure.marked = True
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step(closure)
    finally:
        closure.marked = False

    def in_closure(e) -> bool:
        while e is not None:
            if e.name == "closure":
                return True
            e = e.cpu_parent
        return False

    events = [e for e in prof.events() if e.name.startswith(NS)]
    outside = [e for e in events if not in_closure(e)]
    # nested ops (the reference rsvd calls the sketch op) are counted, their time only once
    top = [e for e in outside if not (e.cpu_parent and e.cpu_parent.name.startswith(NS))]
    return len(outside), len(events) - len(outside), sum(e.cpu_time_total for e in top) / 1e3


def _adamw_ms(model, closure: TimedClosure, steps: int, device: str) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    out = []
    for _ in range(steps + 2):
        opt.zero_grad(set_to_none=True)
        closure()  # gradients, untimed
        common.sync(device)
        t0 = time.perf_counter()
        opt.step()
        common.sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out[2:]


def step_rows(report: common.Report, device: str, quick: bool) -> None:
    from lorenza.demo import optimizers

    steps = 5 if quick else 15
    names = [n for n in optimizers.NAMES if n != "AdamW"]
    for layers in (8, 32):
        model, tokens = _model(layers, device, quick)
        base = model.state_dict()
        closure = TimedClosure(model, tokens, device)
        adamw = _adamw_ms(model, closure, steps, device)
        a_q = common.quantiles(adamw)
        a_med = a_q[0]
        report.add(f"{layers} layers", "AdamW(foreach).step", a_q, op_calls=0, probe_calls=0, lk_ms=0.0, x_adamw=1.0)
        for name in names:
            model.load_state_dict(base)
            # update_interval beyond the measured steps: the refresh at step 1 is excluded below.
            hp = optimizers.Hyper(steps=steps, update_interval=10_000)
            opt = optimizers.build(name, model, hp)
            for _ in range(2):  # state built, first refresh done
                opt.zero_grad(set_to_none=True)
                opt.step(closure)
            calls, in_probe, kernel_ms = _op_calls(opt, closure)
            ms = _optimizer_ms(opt, closure, steps, device)
            q = common.quantiles(ms)
            report.add(f"{layers} layers", name, q, op_calls=calls, probe_calls=in_probe, lk_ms=kernel_ms,
                       x_adamw=q[0] / a_med)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--part", default="ops,first,steps", help="comma list of: ops, first, steps")
    args = p.parse_args(argv)
    parts = {x.strip() for x in args.part.split(",")}
    report = common.Report("dispatch", args.device)
    if "ops" in parts:
        op_rows(report, args.device, args.quick)
    if "first" in parts:
        first_call_rows(report, args.device)
    if "steps" in parts:
        step_rows(report, args.device, args.quick)
    report.finish(args.json)


if __name__ == "__main__":
    main()
