"""Pure-PyTorch reference implementations: they define the meaning of every op."""

from . import (  # noqa: F401  (registers the reference kernels)
    projected_adam,  # noqa: E402,F401  (projected Adam, moment transform)
    rng,
    rsvd,  # noqa: F401  (batched randomized SVD)
    seeded_linear,  # noqa: F401  (the seeded linear layer)
    seeded_ops,
)
