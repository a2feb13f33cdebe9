"""Pure-PyTorch reference implementations: they define the meaning of every op."""

from . import rng, seeded_ops  # noqa: F401  (registers the reference kernels)
from . import rsvd  # noqa: F401  (batched randomized SVD)
