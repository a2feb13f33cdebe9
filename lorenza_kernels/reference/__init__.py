"""Pure-PyTorch reference implementations: they define the meaning of every op."""

from . import rng, seeded_ops  # noqa: F401  (registers the reference kernels)
from . import projected_adam  # noqa: E402,F401  (projected Adam, moment transform)
from . import rsvd  # noqa: F401  (batched randomized SVD)
