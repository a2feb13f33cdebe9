"""Per-step, per-probe seeds: the integers from which every noise tensor is regenerated.

An optimizer never stores noise. It keeps one user seed and a step counter; the noise of probe
``j`` of step ``t`` for the parameter with stream number ``k`` is

    lorenza_kernels.gaussian(p.shape, probe_seed(seed, t, j), k)

(``docs/rng.md``: lorenza-philox-v1, stream ``k`` = the parameter's position in the optimizer's
parameter order, across groups). Anyone holding ``seed`` can therefore regenerate the noise of any
step, on any device and any number of ranks.

Conventions shared by every optimizer of :mod:`lorenza.optim`:

* steps count from 1; ``step = 0`` is reserved for initial state drawn from the stream (LOREN's
  vectors ``a`` use ``probe_seed(seed, 0, 0)``);
* ``probe`` is the index of the probe (query) within the step, from 0;
* probes from ``RESERVED_PROBE_BASE = 2**32`` on are reserved for other noise of a step that is not
  a perturbation probe: ``RESERVED_PROBE_BASE`` itself seeds the randomized-SVD sketches, and
  ``ROUNDING_PROBE_BASE + k`` (:func:`rounding_seed`) the stochastic rounding of the ``k``-th pass
  of a step that writes a low-precision parameter (``docs/rng.md``, "The rounding stream": the
  rounding words are a separate Philox counter range, so even an equal seed gives unrelated bits).
"""

from __future__ import annotations

from lorenza_kernels._checks import seed_value

_MASK64 = (1 << 64) - 1
RESERVED_PROBE_BASE = 1 << 32
ROUNDING_PROBE_BASE = RESERVED_PROBE_BASE + (1 << 16)
INIT_STEP = 0


def splitmix64(x: int) -> int:
    """SplitMix64's output function of ``x + golden gamma`` (Steele, Lea, Flood, OOPSLA 2014).

    Reference code: https://prng.di.unimi.it/splitmix64.c . A bijection of [0, 2^64) with full
    avalanche, so nearby inputs give unrelated outputs.
    """
    z = (int(x) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def probe_seed(seed: int, step: int, probe: int) -> int:
    """The 64-bit Philox seed of probe ``probe`` of step ``step`` of an optimizer seeded with ``seed``.

    ``probe_seed(seed, step, probe) = h(h(h(seed) XOR step) XOR probe)`` with ``h`` =
    :func:`splitmix64`. Every layer is a bijection, so for one seed and one step distinct probes
    always get distinct seeds, and so do distinct steps for one seed and probe; any other two
    triples meet with the probability of a random 64-bit function (about 2^-64).
    """
    seed, step, probe = seed_value(seed, "seed"), seed_value(step, "step"), seed_value(probe, "probe")
    return splitmix64(splitmix64(splitmix64(seed) ^ step) ^ probe)


def rounding_seed(seed: int, step: int, k: int = 0) -> int:
    """The seed of the stochastic rounding of write pass ``k`` of step ``step``:
    ``probe_seed(seed, step, ROUNDING_PROBE_BASE + k)``. A parameter written by several passes of
    one step (MeZO with several probes, LOREN's vectors) gets independent words in each, so every
    rounding is unbiased given the value it rounds; the stream is the parameter's, as for noise."""
    return probe_seed(seed, step, ROUNDING_PROBE_BASE + k)
