"""CPU training: keep freed memory in the process instead of faulting it back in every step.

glibc's malloc serves large blocks (activations, gradients) with mmap and returns freed memory
at the top of the heap to the OS (its thresholds adapt as it goes). In a training loop that
allocates and frees the same large tensors every step, each step then touches freshly mapped
pages, page fault after page fault (what that cost: docs/performance.md, "Lightning's
overhead"). Fixed thresholds keep the memory mapped for reuse, as PyTorch's CUDA caching
allocator does on a GPU.
No library does this for a process already running (jemalloc/tcmalloc need LD_PRELOAD and
glibc's MALLOC_* variables must be set before Python starts), hence a few lines of ctypes.
"""

import ctypes
import ctypes.util

import lightning.pytorch as pl

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum on 64-bit: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 2**30  # free memory at the top of the heap kept up to 1 GiB


def keep_freed_memory() -> bool:
    """Fixed glibc malloc thresholds for this process; False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


class KeepFreedMemory(pl.Callback):
    """Applies keep_freed_memory() when the run trains on the CPU (cpu_keep_freed_memory)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type == "cpu":
            keep_freed_memory()
