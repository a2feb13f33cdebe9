"""Bad input: clear errors that name the argument, and nothing modified. The closure helper."""

from __future__ import annotations

import pytest
import torch
from _optim_common import MLP, SEED, assert_params_equal, mlp_closure, mlp_data, params_of, single_thread  # noqa: F401

from lorenza.optim import SAM, AdaZoSAM, Loren, MeZO, MeZOAdam, make_closure

pytestmark = pytest.mark.usefixtures("single_thread")


def _params():
    return list(MLP(seed=0).parameters())


BAD_CONSTRUCTION = [
    (lambda: MeZO(_params(), lr=-1.0), ValueError, "lr"),
    (lambda: MeZO(_params(), lr=1e-3, mu=-1e-3), ValueError, "mu"),
    (lambda: MeZO(_params(), lr=1e-3, mu=0.0), ValueError, "mu"),
    (lambda: MeZO(_params(), lr=1e-3, num_probes=0), ValueError, "num_probes"),
    (lambda: MeZO(_params(), lr=1e-3, num_probes=1.5), TypeError, "num_probes"),
    (lambda: MeZO(_params(), lr=1e-3, momentum=0.9), TypeError, "momentum"),
    (lambda: MeZO(_params(), lr=1e-3, seed=-1), ValueError, "seed"),
    (lambda: MeZO(_params(), lr=1e-3, weight_decay=float("nan")), ValueError, "weight_decay"),
    (lambda: MeZOAdam(_params(), lr=1e-3, betas=(1.0, 0.9)), ValueError, r"betas\[0\]"),
    (lambda: AdaZoSAM(_params(), rho=-0.1), ValueError, "rho"),
    (lambda: AdaZoSAM(_params(), eps=-1.0), ValueError, "eps"),
    (lambda: AdaZoSAM(_params(), per_layer="yes"), TypeError, "per_layer"),
    (lambda: AdaZoSAM(_params(), state_dtype=torch.int32), TypeError, "state_dtype"),
    (lambda: Loren(_params(), lr=1e-3, num_queries=1), ValueError, "num_queries"),
    (lambda: Loren(_params(), lr=1e-3, damping=-0.1), ValueError, "damping"),
    (lambda: Loren(_params(), lr=1e-3, lr_cov=-1.0), ValueError, "lr_cov"),
    (lambda: Loren(_params(), lr=1e-3, momentum=1.0), ValueError, "momentum"),
    (lambda: MeZO([{"params": _params(), "lrr": 0.1}], lr=1e-3), ValueError, "lrr"),
    (lambda: MeZO([torch.zeros(3, dtype=torch.float64, requires_grad=True)], lr=1e-3), TypeError, r"params\[0\]"),
    (lambda: SAM(_params(), torch.optim.SGD, rho=-1.0, lr=0.1), ValueError, "rho"),
    (lambda: SAM(_params(), torch.optim.SGD(_params(), lr=0.1), lr=0.1), TypeError, "base_optimizer"),
    (lambda: SAM(_params(), torch.optim.SGD, lr=0.1, nesterovv=True), TypeError, "nesterovv"),
]


@pytest.mark.parametrize("build, exc, match", BAD_CONSTRUCTION, ids=[f"case{i}" for i in range(len(BAD_CONSTRUCTION))])
def test_bad_construction(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def _all_optimizers(model):
    return [
        MeZO(model.groups(), lr=1e-2, seed=SEED),
        MeZOAdam(model.groups(), lr=1e-2, seed=SEED),
        AdaZoSAM(model.groups(), lr=1e-2, seed=SEED),
        Loren(model.groups(), lr=1e-2, num_queries=2, seed=SEED),
        SAM(model.groups(), torch.optim.SGD, lr=0.1),
    ]


def test_step_without_closure_modifies_nothing():
    model = MLP(seed=1)
    before = params_of(model)
    for opt in _all_optimizers(model):
        with pytest.raises(TypeError, match="closure"):
            opt.step()
        assert_params_equal(params_of(model), before)
        assert not opt.state and opt.state_dict()["lorenza"].get("step", 0) == 0


def test_non_scalar_closure_is_rejected_and_restored():
    x, y = mlp_data()
    model = MLP(seed=2)
    before = params_of(model)

    def per_sample():
        out = ((model(x) - y) ** 2).mean(1)  # forgot to reduce
        if torch.is_grad_enabled():
            out.sum().backward()
        return out

    for opt in _all_optimizers(model):
        with pytest.raises(ValueError, match="closure.*scalar"):
            opt.step(per_sample)
        # The probe perturbation was in place when the closure returned: removed again (to rounding).
        for p, q in zip(params_of(model), before):
            torch.testing.assert_close(p, q, atol=2e-7, rtol=2e-7)
        assert opt.state_dict()["lorenza"].get("step", 0) == 0
        assert all(set(st) <= {"a", "momentum_buffer"} for st in opt.state.values())  # only initial state


def test_bad_group_changes_modify_nothing():
    x, y = mlp_data()
    model = MLP(seed=3)
    opt = AdaZoSAM(model.parameters(), lr=1e-2, seed=SEED)
    extra = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    with pytest.raises(ValueError, match="foo"):
        opt.add_param_group({"params": [extra], "foo": 1.0})
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["rho"] = -0.5  # edited after construction: caught before any change
    before = params_of(model)
    with pytest.raises(ValueError, match="rho"):
        opt.step(mlp_closure(model, x, y))
    assert_params_equal(params_of(model), before)
    assert opt.global_step == 0


def test_closure_without_backward_is_an_error():
    x, y = mlp_data()
    model = MLP(seed=4)
    opt = AdaZoSAM(model.parameters(), lr=1e-2, seed=SEED)
    with pytest.raises(RuntimeError, match="backward"):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))


def test_make_closure_backward_only_with_grad():
    x, y = mlp_data()
    model = MLP(seed=5)
    closure = make_closure(lambda: torch.nn.functional.mse_loss(model(x), y))
    with torch.no_grad():
        loss = closure()
    assert loss.ndim == 0 and all(p.grad is None for p in model.parameters())
    loss2 = closure()
    assert torch.equal(loss, loss2) and not loss2.requires_grad
    assert model.fc1.weight.grad is not None and model.unused.grad is None
    frozen = make_closure(lambda: torch.nn.functional.mse_loss(model(x).detach(), y))
    with pytest.raises(RuntimeError, match="does not require grad"):
        frozen()
