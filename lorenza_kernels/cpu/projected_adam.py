"""CPU fast path of projected Adam: pure torch on BLAS, registered as backend ``cpu``.

It needs no compiled extension (``cpu/__init__`` imports it unconditionally). The aim is the
fewest passes over the m x n tensors that torch's BLAS allows and no m x n temporary the maths
does not need (docs/kernels.md section 2). Per layer:

1. ``R = Q^T G`` (or ``G Q``): one GEMM into a fresh r x n (m x r) float32 tensor, which the
   maths needs anyway.
2. Adam on R, in place on M and V, then the coefficient matrix of the lift, in R's shape:
   ``X = c_n M / (sqrt(V) / sqrt(bc2) + eps) + lr rs R`` with ``c_n = -lr scale / bc1``,
   done in chunks that stay in the L2 cache (the moments are r/m of the parameter, but a dozen
   elementwise passes over them would otherwise rival the parameter's own traffic). Layers whose
   float32 moments fit in one chunk are done together instead, a group of consecutive layers per
   ``torch._foreach_*`` call (at most ``_FOREACH_NUMEL`` moment elements per group, so its
   temporaries stay bounded): with one torch call per pass per layer, a batch of small layers
   spent more time in the calls than in the arithmetic (measured: 96 layers of 344 x 128 at
   rank 32 took 17 ms per batched step against 8 ms for its two GEMMs). The same elementwise ops
   in the same order: the bits are those of the per-layer chunks.
3. ``W <- a W + b G + lift(X)`` with ``a = 1 - lr wd``, ``b = -lr rs``, per block of rows: the
   block of W gets ``b G`` added (as ``W + (b/a) G``, so that the GEMM's own ``beta = a`` applies
   the decay), then ``addmm_`` writes ``a W + Q X`` into it. A block stays in cache between the
   two, so W and G cross memory once each; the GEMM never allocates an m x n result. (With
   ``rs = 0`` the add is skipped and the whole step is the GEMM with ``beta = a``.)

float32 only goes through BLAS, so bfloat16/float16 tensors are upcast block by block: a
``rows x n`` float32 copy of the block of W (and of G) is the one temporary that cannot be avoided
on the CPU (torch's CPU GEMMs take one dtype and round their output to it; there is no bf16 x bf16
-> fp32 GEMM to accumulate into), and it is bounded by ``_BLOCK_BYTES``, never m x n. The same
holds for the down-projection of a bf16 gradient (blocks of columns on side "left", where R
reduces over rows, and of rows on side "right").

Stochastic rounding of a bfloat16/float16 W (a rounding seed and stream): each float32 block of W
is written back by the ``stochastic_round_`` CPU kernel with the element offset of the block in
W's ``m x n`` view, so element ``i`` draws the rounding word ``i`` wherever the blocks fall
(``docs/rng.md``, "The rounding stream"); without the extension, by the reference's rounding.
"""

from __future__ import annotations

import torch

from .. import _ext
from .._registry import register
from .._shapes import matrix_dims
from ..reference.projected_adam import adam_coefficients
from ..reference.rng import stochastic_round_range

#: float32 bytes of one block of W: small enough to stay in the last-level cache between the
#: add and the GEMM, large enough that BLAS's packing of Q (d x r, once per call) is amortised.
#: Measured on 2 Zen 4 cores (shared, noisy): 512 KiB blocks ran up to 1.5x slower at r = 512.
_BLOCK_BYTES = 1 << 22
#: Elements per chunk of the Adam epilogue: its chunks of R, M, V and the denominator (1 MiB in
#: float32) stay in L2 across its ten elementwise passes.
_ADAM_CHUNK = 1 << 16
#: Moment elements of one group of small layers whose Adam epilogue runs as ``torch._foreach_*``
#: calls (each pass allocates at most this many float32 temporaries).
_FOREACH_NUMEL = 1 << 20
_F32 = torch.float32


def _rows(n: int) -> int:
    return max(4, _BLOCK_BYTES // (4 * max(n, 1)))


def _down(Q: torch.Tensor, G: torch.Tensor, side: str) -> torch.Tensor:
    """R = Q^T G (left) or G Q (right) in float32; Q is already float32."""
    if G.dtype == _F32:
        return Q.t() @ G if side == "left" else G @ Q
    m, n = G.shape
    r = Q.shape[1]
    if side == "left":
        # R reduces over the rows of G: split the columns so that no partial sums are re-read.
        R = torch.empty(r, n, dtype=_F32, device=G.device)
        step = _rows(m)
        for c in range(0, n, step):
            R[:, c : c + step] = Q.t() @ G[:, c : c + step].float()
        return R
    R = torch.empty(m, r, dtype=_F32, device=G.device)
    step = _rows(n)
    for s in range(0, m, step):
        torch.mm(G[s : s + step].float(), Q, out=R[s : s + step])
    return R


def _adam_(R, M, V, beta1, beta2, eps, c_n, sqrt_bc2, c_r) -> None:
    """In place: M, V get Adam's update from R; R becomes the lift coefficient X."""
    r_flat, m_flat, v_flat = R.view(-1), M.view(-1), V.view(-1)
    step = _ADAM_CHUNK
    for s in range(0, r_flat.numel(), step):
        g = r_flat[s : s + step]
        mb, vb = m_flat[s : s + step], v_flat[s : s + step]
        m32 = mb if mb.dtype == _F32 else mb.float()
        v32 = vb if vb.dtype == _F32 else vb.float()
        m32.lerp_(g, 1.0 - beta1)  # as torch.optim.AdamW, for the same rounding
        v32.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = torch.sqrt(v32).div_(sqrt_bc2).add_(eps)
        if c_r != 0.0:
            g.mul_(c_r).addcdiv_(m32, denom, value=c_n)
        else:
            torch.div(m32, denom, out=g).mul_(c_n)
        if m32 is not mb:
            mb.copy_(m32)
        if v32 is not vb:
            vb.copy_(v32)


def _write_back(w: torch.Tensor, w32: torch.Tensor, offset: int, rounding: tuple[int, int] | None) -> None:
    """``w <- w32`` (a block of W starting at element ``offset`` of its m x n view): rounded to
    nearest, or stochastically with the rounding stream ``rounding = (seed, stream)``."""
    if rounding is None:
        w.copy_(w32)
    elif _ext._C is not None:
        from .seeded_ops import stochastic_round_at

        stochastic_round_at([w], [w32], [offset], rounding[0], [rounding[1]])
    else:
        w.copy_(stochastic_round_range(w32, offset, rounding[0], rounding[1], w.dtype).view(w.shape))


def _lift_(W, G, Q, X, side: str, a: float, b: float, rounding: tuple[int, int] | None = None, offset: int = 0) -> None:
    """W <- a W + b G + lift(X), block of rows by block of rows (W, G are m x n views); with
    ``rounding``, element ``i`` of W takes the rounding word ``offset + i``."""
    m, n = W.shape
    if a == 0.0:  # lr wd == 1: the decay erases W; keep the (b/a) trick below well defined
        W.zero_()
        a = 1.0
    ratio = b / a
    step = _rows(n)
    for s in range(0, m, step):
        w, g = W[s : s + step], G[s : s + step]
        w32 = w if w.dtype == _F32 else w.float()
        if b != 0.0:
            w32.add_(g, alpha=ratio)
        if side == "left":
            w32.addmm_(Q[s : s + step], X, beta=a)
        else:
            w32.addmm_(X[s : s + step], Q.t(), beta=a)
        if w32 is not w:
            _write_back(w, w32, offset + s * n, rounding)


def _adam_foreach_(Rs, Ms, Vs, beta1, beta2, eps, c_ns, sqrt_bc2s, c_r) -> list[torch.Tensor]:
    """:func:`_adam_` over a list of layers (float32 moments), one ``torch._foreach_*`` call per
    pass; the same ops in the same order, so the same bits. Returns the coefficient matrices X
    (``Rs``' tensors, or fresh ones when ``c_r == 0``)."""
    torch._foreach_lerp_(Ms, Rs, 1.0 - beta1)
    torch._foreach_mul_(Vs, beta2)
    torch._foreach_addcmul_(Vs, Rs, Rs, value=1.0 - beta2)
    denom = torch._foreach_sqrt(Vs)
    torch._foreach_div_(denom, sqrt_bc2s)
    torch._foreach_add_(denom, eps)
    if c_r != 0.0:
        torch._foreach_mul_(Rs, c_r)
        torch._foreach_addcdiv_(Rs, Ms, denom, c_ns)
        return Rs
    X = torch._foreach_div(Ms, denom)
    torch._foreach_mul_(X, c_ns)
    return X


def _groups(exp_avgs, exp_avg_sqs) -> list[tuple[list[int], bool]]:
    """Consecutive layers in groups, each with whether its epilogue is the foreach one: a layer
    alone and chunked unless its moments are float32 and fit in one chunk; such small layers
    together up to ``_FOREACH_NUMEL`` elements (a small layer beyond that bound: alone, foreach)."""
    groups: list[tuple[list[int], bool]] = []
    open_numel = None  # numel of the open group of small layers, None when there is none
    for k, (M, V) in enumerate(zip(exp_avgs, exp_avg_sqs)):
        numel = M.numel()
        if M.dtype != _F32 or V.dtype != _F32 or numel > _ADAM_CHUNK:
            groups.append(([k], False))
            open_numel = None
        elif open_numel is not None and open_numel + numel <= _FOREACH_NUMEL:
            groups[-1][0].append(k)
            open_numel += numel
        else:
            groups.append(([k], True))
            open_numel = numel if numel <= _FOREACH_NUMEL else None
    return groups


@register("projected_adam_step_", "cpu", "cpu")
def projected_adam_step_(
    params, grads, projs, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, scale, side,
    residual_scale, rounding_seed=None, rounding_streams=None, rounding_offsets=None,
) -> None:  # fmt: skip
    c_r = lr * residual_scale
    for group, foreach in _groups(exp_avgs, exp_avg_sqs):
        views, Qs, Rs = [], [], []
        for layer in group:
            m, n = matrix_dims(params[layer])
            W2, G2 = params[layer].view(m, n), grads[layer].view(m, n)
            proj = projs[layer]
            Q = proj if proj.dtype == _F32 else proj.float()  # d x r: small
            views.append((W2, G2))
            Qs.append(Q)
            Rs.append(_down(Q, G2, side))
        coefs = [adam_coefficients(steps[layer], lr, beta1, beta2, scale) for layer in group]
        # X = c_n N' + lr rs R, so that a W + b G + lift(X) is the whole update with b = -lr rs.
        if foreach:
            Ms, Vs = [exp_avgs[k] for k in group], [exp_avg_sqs[k] for k in group]
            Xs = _adam_foreach_(Rs, Ms, Vs, beta1, beta2, eps, [c[0] for c in coefs], [c[1] for c in coefs], c_r)
        else:
            (c_n, sqrt_bc2), layer = coefs[0], group[0]
            _adam_(Rs[0], exp_avgs[layer], exp_avg_sqs[layer], beta1, beta2, eps, c_n, sqrt_bc2, c_r)
            Xs = Rs
        for layer, (W2, G2), Q, X in zip(group, views, Qs, Xs):
            rounding = None if rounding_seed is None else (rounding_seed, rounding_streams[layer])
            offset = rounding_offsets[layer] if rounding_offsets is not None else 0
            _lift_(W2, G2, Q, X, side, 1.0 - lr * weight_decay, -c_r, rounding, offset)
