"""Every Triton launcher runs under a device guard for its tensors' device: Triton launches on the
current CUDA device, so on a machine with several GPUs a tensor on ``cuda:1`` would otherwise be
handed to a kernel on ``cuda:0``. Checked under the interpreter by recording the guard's argument
(the launches themselves need no GPU here; with one GPU a wrong device cannot show)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import require_backend

import lorenza_kernels as lk

pytestmark = pytest.mark.triton_interpret


def _record(monkeypatch, module) -> list[torch.device]:
    seen: list[torch.device] = []

    def guard(device):
        seen.append(torch.device(device))
        return contextlib.nullcontext()

    monkeypatch.setattr(module, "device_guard", guard)
    return seen


def _run_projected_adam():
    w, g = torch.randn(9, 7), torch.randn(9, 7)
    q = torch.linalg.qr(torch.randn(7, 3))[0].contiguous()
    m, v = torch.zeros(9, 3), torch.zeros(9, 3)
    lk.projected_adam_step_(w, g, q, m, v, step=1, lr=1e-3, side="right")


def _run_rsvd():
    lk.randomized_range(torch.randn(2, 20, 12), 3, side="right", power_iters=0)


def _run_seeded_axpby():
    lk.seeded_axpby_([torch.zeros(10)], 1, 1.0, 1.0)


@pytest.mark.parametrize(
    "op,module,run",
    [
        ("projected_adam_step_", "projected_adam", _run_projected_adam),
        ("rsvd_sketch", "rsvd", _run_rsvd),
        ("seeded_axpby_", "seeded_ops", _run_seeded_axpby),
    ],
)
def test_launches_are_guarded_for_the_tensors_device(op, module, run, monkeypatch):
    require_backend(op, "triton", "cpu")
    import importlib

    seen = _record(monkeypatch, importlib.import_module(f"lorenza_kernels.triton.{module}"))
    with lk.use_backend("triton"):
        run()
    assert seen, f"{op}: the Triton launcher entered no device guard"
    assert all(d.type == "cpu" for d in seen), seen  # the interpreter's tensors live on the CPU
