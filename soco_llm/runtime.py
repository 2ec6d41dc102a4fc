"""Where tensors run: dtype names, and the distributed context a caller set up.

The library never starts a process group itself: the CLI (or the user's own script) calls
`init_distributed()` under torchrun / accelerate launch; library code only asks `world()`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import SocoError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SocoError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def world() -> tuple[int, int]:
    """(rank, world size) of the process group the caller joined; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the process group torchrun / accelerate launch set up (NCCL on GPUs, gloo on CPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
