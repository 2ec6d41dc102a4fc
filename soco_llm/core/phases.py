"""The phases of a long method run: their wall time and peak device memory, and one clear line (the
phase and the setting to lower) instead of a traceback when a phase runs out of memory."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

from ..errors import SocoError


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)  # the CPU allocator's wording


class Phases:
    """`with phases("teacher", "lower --batch-size"): ...` times the block (synchronising the device at its
    edges, so asynchronous GPU work is counted in its own phase) and records its peak device memory."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.peak_mib: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str, advice: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        start = time.perf_counter()
        try:
            yield
            self._sync()
        except Exception as e:
            if _out_of_memory(e):
                raise SocoError(f"out of {self.device.type.upper()} memory during {name}; {advice}") from e
            raise
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if cuda:
                self.peak_mib[name] = torch.cuda.max_memory_allocated(self.device) / 2**20

    def record(self) -> dict:
        out = {"seconds": {k: round(v, 3) for k, v in self.seconds.items()}}
        if self.peak_mib:
            out["peak_gpu_mib"] = {k: round(v, 1) for k, v in self.peak_mib.items()}
        return out
