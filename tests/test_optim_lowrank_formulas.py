"""Lorenza and Lorenza+ against an independent float64 implementation of docs/algorithms.md's formula:
probes P = U_r diag(u) V_r^T (the gradient's singular vectors, u: r numbers; the default) or P = Q U /
U Q^T (probe_space="subspace"), the noise materialised from lorenza_kernels.gaussian and probe_seed,
the rho-normalised ascent over all parameters, refreshes from the exact SVD of the step's gradient,
every moment transform, the residual term, both sides, 1 and 3 probes."""

from __future__ import annotations

import math

import pytest
import torch
from _optim_common import SEED, Problem, noise, single_thread  # noqa: F401

from lorenza.optim import Lorenza, LorenzaPlus

pytestmark = pytest.mark.usefixtures("single_thread")

# (8, 6): right side (Q 6 x 2); (5, 9): left (Q 5 x 3); (4, 3, 3): viewed 4 x 9, left (Q 4 x 2);
# (4,) and (3, 2) (min(m, n) = 2 <= rank 3): dense, as AdaZo-SAM.
SHAPES = [(8, 6), (5, 9), (4, 3, 3), (4,), (3, 2)]
ORDER = [0, 2, 3, 1, 4]  # the optimizer's parameter order (two groups), hence the streams
GROUP_A = dict(rank=2, update_interval=3, weight_decay=0.1, mu=1e-2, rho=0.1)
GROUP_B = dict(rank=3, update_interval=2, weight_decay=0.0, mu=2e-2, rho=0.05)
LR, SCALE, BETAS, EPS = 0.02, 0.25, (0.9, 0.99), 1e-8


def _hp(s):
    return GROUP_A if s < 3 else GROUP_B


def _dims(shape):
    return shape[0], math.prod(shape[1:])


def _layout(shape, rank):
    """(m, n, side, r) or None (dense), by docs/algorithms.md's rule."""
    if len(shape) < 2 or rank >= min(_dims(shape)):
        return None
    m, n = _dims(shape)
    return m, n, "right" if m >= n else "left", rank


def _svd_basis(G, lay, q_opt):
    """Top-r singular vectors of G (float64), each column's sign taken from the optimizer's Q
    (singular vectors are defined up to sign; the formula must use the optimizer's choice)."""
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    Q = U[:, : lay[3]] if lay[2] == "left" else Vh[: lay[3]].t()
    signs = torch.sign((Q * q_opt).sum(0))
    Q = Q * signs
    torch.testing.assert_close(Q, q_opt, atol=1e-4, rtol=0)  # the optimizer's basis is G's
    return Q


def _down(Q, G, side):
    return G @ Q if side == "right" else Q.t() @ G


def _lift(Q, X, side):
    return X @ Q.t() if side == "right" else Q @ X


def _run(cls, q, transform, residual, steps=7, **extra):
    problem = Problem(SHAPES, gen_seed=4)
    params = problem.params()
    groups = [
        {"params": [params[i] for i in ORDER[:3]], **GROUP_A},
        {"params": [params[i] for i in ORDER[3:]], **GROUP_B},
    ]
    if residual is not None:
        extra["residual_scale"] = residual
    opt = cls(groups, lr=LR, scale=SCALE, betas=BETAS, eps=EPS, num_probes=q, moment_transform=transform,
              svd="exact", seed=SEED, **extra)  # fmt: skip
    rs = opt.param_groups[0]["residual_scale"]
    shapes = [SHAPES[i] for i in ORDER]
    theta = [problem.init[i].float().double() for i in ORDER]
    lays = [_layout(sh, _hp(s)["rank"]) for s, sh in enumerate(shapes)]
    st = [dict(Q=None, F=None, M=None, V=None, step=0, updates=0) for _ in shapes]
    singular = opt._global["probe_space"] == "singular"

    def loss(ps):
        return problem.loss([ps[ORDER.index(i)] for i in range(len(ps))])

    for t in range(1, steps + 1):
        opt.step(problem.closure(params))
        eps = [torch.zeros_like(x) for x in theta]
        if t > 1:  # step 1 builds the bases from the gradient at theta: no ascent
            c, P, norm2 = [], [], 0.0
            for j in range(q):
                Pj = []
                for s, (sh, lay) in enumerate(zip(shapes, lays)):
                    if lay is None:
                        z = noise(sh, SEED, t, j, s)
                        Pj.append((z, z))
                    elif singular:  # P = U_r diag(u) V_r^T, u: r numbers; ||P|| = ||u||
                        m, n, side, r = lay
                        u = noise((r,), SEED, t, j, s)
                        Ur, Vr = (st[s]["F"], st[s]["Q"]) if side == "right" else (st[s]["Q"], st[s]["F"])
                        Pj.append((u, ((Ur * u) @ Vr.t()).reshape(sh)))
                    else:  # P = Q U (left) or U Q^T (right), U of R's shape; ||P|| = ||U||
                        m, n, side, r = lay
                        U = noise((m, r) if side == "right" else (r, n), SEED, t, j, s)
                        Pj.append((U, _lift(st[s]["Q"], U, side).reshape(sh)))
                lp = loss([x + _hp(s)["mu"] * p for s, (x, (_, p)) in enumerate(zip(theta, Pj))])
                lm = loss([x - _hp(s)["mu"] * p for s, (x, (_, p)) in enumerate(zip(theta, Pj))])
                cj = [float(lp - lm) / (2 * _hp(s)["mu"]) for s in range(len(shapes))]
                norm2 += sum(cj[s] ** 2 * float(u.square().sum()) for s, (u, _) in enumerate(Pj))
                c.append(cj)
                P.append([p for _, p in Pj])
            norm = math.sqrt(norm2 / q**2)
            eps = [_hp(s)["rho"] * sum(c[j][s] * P[j][s] for j in range(q)) / q / norm for s in range(len(shapes))]
        at = [(x + e).requires_grad_() for x, e in zip(theta, eps)]
        grads = torch.autograd.grad(loss(at), at)
        b1, b2 = BETAS
        for s, (sh, lay, g) in enumerate(zip(shapes, lays, grads)):
            S, hp = st[s], _hp(s)
            if lay is None:  # dense AdamW
                R, W = g, theta[s]
            else:
                m, n, side, r = lay
                G = g.reshape(m, n)
                if S["updates"] % hp["update_interval"] == 0:
                    ost = opt.state[params[ORDER[s]]]
                    Qn = _svd_basis(G, lay, ost["proj"].double())
                    if singular:  # the other side's singular vectors, signs as the optimizer's
                        S["F"] = _svd_basis(G, (*lay[:2], "left" if side == "right" else "right", lay[3]),
                                            ost["factor"].double())  # fmt: skip
                    if S["Q"] is not None and transform == "rotate":
                        O = Qn.t() @ S["Q"]  # noqa: E741 - the O of docs/algorithms.md
                        if side == "left":
                            S["M"], S["V"] = O @ S["M"], (O * O) @ S["V"]
                        else:
                            S["M"], S["V"] = S["M"] @ O.t(), S["V"] @ (O * O).t()
                    if S["Q"] is not None and transform == "reset":
                        S["M"], S["V"], S["step"] = None, None, 0
                    S["Q"] = Qn
                R, W = _down(S["Q"], G, side), theta[s].reshape(m, n)
            if S["M"] is None:
                S["M"], S["V"] = torch.zeros_like(R), torch.zeros_like(R)
            S["step"] += 1
            S["updates"] += 1
            S["M"] = b1 * S["M"] + (1 - b1) * R
            S["V"] = b2 * S["V"] + (1 - b2) * R * R
            N = (S["M"] / (1 - b1 ** S["step"])) / ((S["V"] / (1 - b2 ** S["step"])).sqrt() + EPS)
            W = W * (1 - LR * hp["weight_decay"])
            if lay is None:
                W = W - LR * N
            else:
                W = W - LR * SCALE * _lift(S["Q"], N, lay[2]) - LR * rs * (G - _lift(S["Q"], R, lay[2]))
            theta[s] = W.reshape(sh)
        for s, i in enumerate(ORDER):
            got = params[i].detach().double()
            torch.testing.assert_close(got, theta[s], atol=2e-5, rtol=1e-4, msg=f"step {t} tensor {i}")
            ost = opt.state[params[i]]
            torch.testing.assert_close(ost["exp_avg"].double(), st[s]["M"], atol=1e-5, rtol=1e-4)
            assert ost["step"] == st[s]["step"]
    return opt, params, st


CASES = [
    ("rotate", 1, None),
    ("keep", 3, None),
    ("reset", 1, 0.0),
    ("rotate", 3, 0.3),  # Lorenza+ with an explicit residual
]


@pytest.mark.parametrize("probe_space", ["singular", "subspace"])
@pytest.mark.parametrize("probe", ["exact", "inplace"])
@pytest.mark.parametrize("transform, q, residual", CASES, ids=[f"{a}-q{b}-rs{c}" for a, b, c in CASES])
def test_lorenza_matches_formula(transform, q, residual, probe, probe_space):
    cls = Lorenza if not residual else LorenzaPlus
    opt, params, st = _run(cls, q, transform, residual, probe=probe, probe_space=probe_space)
    a, b = opt.state[params[0]], opt.state[params[1]]
    assert a["proj"].shape == (6, 2) and a["exp_avg"].shape == (8, 2)  # right side
    assert b["proj"].shape == (5, 3) and b["exp_avg"].shape == (3, 9)  # left side
    assert opt.state[params[2]]["exp_avg"].shape == (2, 9)  # 4 x 9 view of a 3-D tensor
    assert (a["refreshes"], b["refreshes"]) == (3, 4)  # updates 0, 3, 6 and 0, 2, 4, 6
    assert a["updates"] == 7 and a["step"] == (1 if transform == "reset" else 7)
    assert "proj" not in opt.state[params[4]] and opt.state[params[4]]["exp_avg"].shape == (3, 2)


def test_lorenza_plus_default_residual_and_one_step():
    """Lorenza+ default residual_scale = 0.1 scale; one step (no ascent at step 1) by the formula."""
    opt, params, _ = _run(LorenzaPlus, 1, "rotate", None, steps=1)
    assert opt.param_groups[0]["residual_scale"] == pytest.approx(0.1 * SCALE)
    assert opt.global_step == 1 and all(opt.state[p]["step"] == 1 for p in params)
