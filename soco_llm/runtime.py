"""Where tensors run: dtype names, device names (`resolve_device`), and the distributed context a caller set up.

The library never starts a process group itself: the CLI (or the user's own script) calls
`init_distributed()` under torchrun / accelerate launch; library code only asks `world()`.
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.distributed as dist

from .errors import SocoError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ["auto", *DTYPES]  # auto: the checkpoint's own dtype


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the name configs and run records store."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype, or None for the checkpoint's own ("auto")."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise SocoError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (CUDA when torch sees a GPU, else the CPU), 'cpu', 'cuda' or 'cuda:N', checked against this machine
    so that a missing GPU is one clear line, not torch's assertion deep inside `.to()`. Under torchrun,
    'auto' and 'cuda' mean this process's own GPU (LOCAL_RANK)."""
    if isinstance(device, torch.device):
        return device
    text = "auto" if device is None else device.strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    kind, sep, index = text.partition(":")
    if kind != "cuda" or (sep and not index.isdigit()):
        raise SocoError(f"unknown device {device!r}; choose {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
        raise SocoError(f"--device {device}: {why}; use --device cpu (or --device auto, which falls back to the CPU)")
    n = int(index) if index else int(os.environ.get("LOCAL_RANK", "0"))
    if n >= torch.cuda.device_count():
        raise SocoError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0; choose cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", n)


def world() -> tuple[int, int]:
    """(rank, world size) of the process group the caller joined; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device | None = None) -> None:
    """Join the process group torchrun / accelerate launch set up: NCCL for a CUDA `device`, gloo for the CPU
    (without a device: NCCL whenever torch sees a GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if cuda and device is not None:
            torch.cuda.set_device(device)  # NCCL's collectives run on the current device
        dist.init_process_group("nccl" if cuda else "gloo")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


def keep_freed_host_memory() -> bool:
    """Serve large host allocations from the heap and keep freed heap for reuse (glibc only; True if applied).

    A CPU training step allocates the same large temporaries every step (the logits, tokens × vocabulary,
    and their log-probs and gradients). By default glibc maps every block over 32 MiB fresh from the OS and
    unmaps it when freed, so each step page-faults them in again. Kept, SoCo's step on the default model
    took a fifth of the page faults and 0.90× the time, but its peak RSS rose by 0.3 GiB, 7 % (freed blocks
    are no longer handed back; benchmarks/results/train_step_host_memory.md). So it is opt-in:
    process-wide, the library never calls it; the CLI does when SOCO_KEEP_HOST_MEMORY=1.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        # Trim only a free top of the heap over 2 GiB (mallopt takes a C int): no step frees that much at once.
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc: its allocator keeps its own counsel
        return False
