"""Each zeroth-order optimizer against an independent float64 implementation of its formula
(docs/algorithms.md), the noise materialised here with lorenza_kernels.gaussian and probe_seed."""

from __future__ import annotations

import math

import pytest
import torch
from _optim_common import SEED, Problem, noise, single_thread  # noqa: F401

import lorenza_kernels as lk
from lorenza.optim import AdaZoSAM, Loren, MeZO, MeZOAdam, make_closure, probe_seed, splitmix64

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPES = [(4, 3), (3,), (2, 3, 2), (5,)]
# Two groups: tensors 0 and 2 (decayed), then 1 and 3 (no decay, another mu). The optimizer's
# parameter order, hence the streams, is [0, 2, 1, 3].
ORDER = [0, 2, 1, 3]


def _groups(params, **first):
    a = {"params": [params[0], params[2]], "weight_decay": 0.1, **first}
    b = {"params": [params[1], params[3]], "weight_decay": 0.0, "mu": 2e-2}
    return [a, b]


def _hp(i, mu=1e-2, lr=0.05):
    """(lr, weight_decay, mu) of tensor i under _groups."""
    return (lr, 0.1, mu) if i in (0, 2) else (lr, 0.0, 2e-2)


def _start(problem):
    return [problem.init[i].float().double() for i in ORDER]


def _close(params, theta, atol=2e-5, rtol=1e-4):
    for s, i in enumerate(ORDER):
        torch.testing.assert_close(params[i].detach().double(), theta[s], atol=atol, rtol=rtol)


def _zo_estimates(problem, theta, hps, t, q):
    """c[j][i] and z[j][i] of the two-sided probes of step t (tensors in optimizer order)."""
    loss = lambda ps: problem.loss([ps[ORDER.index(i)] for i in range(len(ps))])  # noqa: E731
    c, z = [], []
    for j in range(q):
        zj = [noise(p.shape, SEED, t, j, s) for s, p in enumerate(theta)]
        lp = loss([p + h[2] * zz for p, h, zz in zip(theta, hps, zj)])
        lm = loss([p - h[2] * zz for p, h, zz in zip(theta, hps, zj)])
        c.append([float(lp - lm) / (2 * h[2]) for h in hps])
        z.append(zj)
    return c, z


PROBES = pytest.mark.parametrize("probe", ["exact", "inplace"])


@PROBES
@pytest.mark.parametrize("q", [1, 2])
def test_mezo_matches_formula(q, probe):
    problem = Problem(SHAPES)
    params = problem.params()
    opt = MeZO(_groups(params), lr=0.05, mu=1e-2, num_probes=q, seed=SEED, probe=probe)
    hps = [_hp(i) for i in ORDER]
    theta = _start(problem)
    for t in range(1, 6):
        opt.step(problem.closure(params))
        c, z = _zo_estimates(problem, theta, hps, t, q)
        theta = [
            (1 - lr * wd) * p - lr * sum(c[j][s] * z[j][s] for j in range(q)) / q
            for s, (p, (lr, wd, _)) in enumerate(zip(theta, hps))
        ]
        _close(params, theta)
    assert opt.state_dict()["lorenza"]["step"] == 5 and not opt.state


@PROBES
def test_mezo_adam_matches_formula(probe):
    problem = Problem(SHAPES)
    params = problem.params()
    opt = MeZOAdam(_groups(params), lr=0.02, mu=1e-2, betas=(0.8, 0.99), eps=1e-6, seed=SEED, probe=probe)
    hps = [_hp(i, lr=0.02) for i in ORDER]
    theta = _start(problem)
    m = [torch.zeros_like(p) for p in theta]
    v = [torch.zeros_like(p) for p in theta]
    for t in range(1, 5):
        opt.step(problem.closure(params))
        c, z = _zo_estimates(problem, theta, hps, t, 1)
        for s, (lr, wd, _) in enumerate(hps):
            g = c[0][s] * z[0][s]
            m[s] = 0.8 * m[s] + 0.2 * g
            v[s] = 0.99 * v[s] + 0.01 * g * g
            denom = (v[s] / (1 - 0.99**t)).sqrt() + 1e-6
            theta[s] = theta[s] * (1 - lr * wd) - lr * (m[s] / (1 - 0.8**t)) / denom
        _close(params, theta)
    st = opt.state[params[0]]
    assert st["step"] == 4 and st["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(st["exp_avg"].double(), m[0], atol=1e-6, rtol=1e-4)


@PROBES
@pytest.mark.parametrize("q", [1, 3])
def test_adazo_sam_matches_formula(q, probe):
    problem = Problem(SHAPES)
    params = problem.params()
    rho = 0.1
    opt = AdaZoSAM(_groups(params), lr=0.02, mu=1e-2, rho=rho, num_probes=q, betas=(0.9, 0.99), seed=SEED, probe=probe)
    hps = [_hp(i, lr=0.02) for i in ORDER]
    theta = _start(problem)
    m = [torch.zeros_like(p) for p in theta]
    v = [torch.zeros_like(p) for p in theta]
    for t in range(1, 5):
        opt.step(problem.closure(params))
        c, z = _zo_estimates(problem, theta, hps, t, q)
        # docs/algorithms.md choice: ||G||^2 = (1/q^2) sum_j c_j^2 ||z_j||^2 (per-tensor c, global sum).
        norm = math.sqrt(sum(c[j][s] ** 2 * float(z[j][s].square().sum()) for j in range(q) for s in range(4)) / q**2)
        eps = [rho * sum(c[j][s] * z[j][s] for j in range(q)) / q / norm for s in range(4)]
        if q == 1:  # no cross terms: ||eps|| = rho exactly
            assert math.isclose(sum(float(e.square().sum()) for e in eps), rho**2, rel_tol=1e-9)
        at = [(p + e).requires_grad_() for p, e in zip(theta, eps)]
        grads = torch.autograd.grad(problem.loss([at[ORDER.index(i)] for i in range(4)]), at)
        for s, (lr, wd, _) in enumerate(hps):
            g = grads[s]
            m[s] = 0.9 * m[s] + 0.1 * g
            v[s] = 0.99 * v[s] + 0.01 * g * g
            denom = (v[s] / (1 - 0.99**t)).sqrt() + 1e-8
            theta[s] = theta[s] * (1 - lr * wd) - lr * (m[s] / (1 - 0.9**t)) / denom
        _close(params, theta)


def _dims(shape):
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))


@PROBES
@pytest.mark.parametrize("K", [2, 5])
def test_loren_matches_formula(K, probe):
    shapes = [(4, 3), (5,), (2, 3, 2)]  # a matrix, a vector, a 3-D tensor viewed as 2 x 6
    problem = Problem(shapes, gen_seed=3)
    params = problem.params()
    hp = dict(lr=0.05, mu=0.05, damping=0.1, lr_cov=20.0, momentum=0.8, weight_decay=0.1)
    opt = Loren(params, num_queries=K, seed=SEED, probe=probe, **hp)
    theta = [x.float().double() for x in problem.init]
    a = [lk.gaussian(_dims(s)[1], probe_seed(SEED, 0, 0), i).double() for i, s in enumerate(shapes)]
    a0 = [x.clone() for x in a]
    M = [torch.zeros(_dims(s), dtype=torch.float64) if len(s) >= 2 else None for s in shapes]
    mu, lr = hp["mu"], hp["lr"]
    for t in range(1, 5):
        opt.step(problem.closure(params))
        abar = [x.expand(_dims(s)) for x, s in zip(a, shapes)]
        sq = [float(ab.square().sum()) for ab in abar]  # s = m ||a||^2
        D = [math.sqrt(hp["damping"] + s) for s in sq]
        c = [(math.sqrt(hp["damping"]) + d) / (s * d) for s, d in zip(sq, D)]
        u = [[noise(s, SEED, t, k, i).reshape(_dims(s)) for i, s in enumerate(shapes)] for k in range(K)]
        pk = [[float((ab * uu).sum()) for ab, uu in zip(abar, uk)] for uk in u]
        Su = [[uu - c[i] * pk[k][i] * abar[i] for i, uu in enumerate(uk)] for k, uk in enumerate(u)]
        f = [float(problem.loss([x + mu * su.reshape(x.shape) for x, su in zip(theta, Su[k])])) for k in range(K)]
        fbar = sum(f) / K
        for i, s in enumerate(shapes):
            g = sum((f[k] - fbar) / (mu * (K - 1)) * Su[k][i] for k in range(K)).reshape(s)
            if M[i] is not None:
                M[i] = hp["momentum"] * M[i] + g.reshape(M[i].shape)
                g = M[i].reshape(s)
            theta[i] = theta[i] * (1 - lr * hp["weight_decay"]) - lr * g
            m = _dims(s)[0]
            ga = sum(
                (f[k] - fbar) / (K - 1) * mu**2
                * (pk[k][i] * u[k][i].sum(0) - m * a[i] - c[i] * (pk[k][i] ** 2 - sq[i]) * m * a[i]) / D[i]
                for k in range(K)
            )  # fmt: skip
            a[i] = a[i] - hp["lr_cov"] * ga
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach().double(), theta[i], atol=2e-5, rtol=1e-4)
            st = opt.state[p]
            torch.testing.assert_close(st["a"].double(), a[i], atol=1e-5, rtol=1e-4)
            if M[i] is not None:
                torch.testing.assert_close(
                    st["momentum_buffer"].double().reshape(M[i].shape), M[i], atol=1e-4, rtol=1e-4
                )
            else:
                assert "momentum_buffer" not in st
    # The test is not vacuous: a moved, and per coordinate for the vector (not one shared shift).
    assert all((x - y).abs().max() > 1e-3 for x, y in zip(a, a0))
    assert (a[1] - a0[1]).std() > 1e-4


def test_probe_seed_is_splitmix_nesting():
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # the first output of splitmix64.c seeded with 0
    assert probe_seed(7, 3, 1) == splitmix64(splitmix64(splitmix64(7) ^ 3) ^ 1)
    seeds = {probe_seed(SEED, t, j) for t in range(50) for j in range(20)}
    assert len(seeds) == 1000
    with pytest.raises(ValueError, match="seed"):
        probe_seed(-1, 0, 0)


def test_add_param_group_keeps_streams():
    """Streams are positions in the parameter order: adding a group later is the same optimizer."""
    problem = Problem(SHAPES)
    pa, pb = problem.params(), problem.params()
    groups = _groups(pa)
    opt_a = MeZO(groups, lr=0.05, mu=1e-2, seed=SEED)
    opt_b = MeZO(_groups(pb)[:1], lr=0.05, mu=1e-2, seed=SEED)
    opt_b.add_param_group(_groups(pb)[1])
    for _ in range(3):
        opt_a.step(problem.closure(pa))
        opt_b.step(problem.closure(pb))
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


# --- LOREN's covariance: how far it moves ---------------------------------------------------------


def _loren_quadratic(covariance: str, lr_cov: float, steps: int = 60):
    from lorenza.optim import Loren

    m, n = 8, 16
    h = torch.logspace(0, 2, n, dtype=torch.float64)
    target = torch.randn(m, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = torch.nn.Parameter(torch.zeros(m, n))
    opt = Loren([X], lr=1e-3, num_queries=4, seed=1, covariance=covariance, lr_cov=lr_cov)
    a0 = None
    steps_seen = []
    for _ in range(steps):
        opt.step(make_closure(lambda: 0.5 * (((X.double() - target) ** 2) * h).mean()))
        if a0 is None:
            a0 = opt.state[X]["a"].clone()
        steps_seen.append(opt.covariance_steps()[0])
    a = opt.state[X]["a"]
    return float((a - a0).norm() / a0.norm()), steps_seen


def test_loren_paper_covariance_is_inert_at_its_defaults():
    # docs/algorithms.md, "LOREN": the published step scales like mu^4 times the curvature; at the
    # defaults (mu 1e-3, lr_cov 1e-3) it is below float32's resolution of a
    moved, rel = _loren_quadratic("paper", 1e-3)
    assert max(rel) < 1e-8 and moved < 1e-6


def test_loren_normalized_covariance_moves_by_lr_cov_per_step():
    # the documented setting: covariance="normalized", lr_cov=1e-2 -> each step moves a by 1% of ||a||
    moved, rel = _loren_quadratic("normalized", 1e-2)
    assert all(abs(r - 1e-2) < 1e-4 for r in rel[1:])
    assert moved > 0.05


def test_loren_covariance_option_is_checked_and_saved():
    from lorenza.optim import Loren

    p = torch.nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="covariance"):
        Loren([p], covariance="natural")
    opt = Loren([p], covariance="normalized")
    sd = opt.state_dict()
    assert sd["lorenza"]["covariance"] == "normalized"
    other = Loren([torch.nn.Parameter(torch.zeros(4, 3))])
    other.load_state_dict(sd)
    assert other._global["covariance"] == "normalized"
