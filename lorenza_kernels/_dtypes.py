"""dtype codes shared with csrc/common/dtype.h."""

import torch

CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def code(dtype: torch.dtype) -> int:
    return CODES[dtype]
