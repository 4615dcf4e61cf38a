"""glibc malloc settings for a process that trains (the loop applies them first).

PyTorch's CPU tensors come from malloc. glibc gives a block above M_MMAP_THRESHOLD its
own mapping and unmaps it when freed, and returns the free top of the heap to the OS
above M_TRIM_THRESHOLD; both thresholds start at 128 KiB / 256 KiB and move at run time
with the process's own allocation history. A training step frees and allocates its
activations and gradients (MiBs each) every step, so they kept coming back as fresh
pages that the kernel faults in and zeroes: on the CI machine (2 cores, fp32 lecture CNN,
batch 128, one MNIST epoch) 2.2M minor page faults and 4.5 s of system time, 9,100
samples/s against 15,400 with the thresholds fixed high (three interleaved pairs), and
the speed of a run swung with whatever its imports had allocated and freed before.

This is the problem for which PyTorch's CPU performance tuning guide recommends
jemalloc or tcmalloc (pytorch.org/tutorials/recipes/recipes/tuning_guide.html, "Switch
Memory allocator"); glibc's own `mallopt` fixes it without a new library or an
LD_PRELOAD, at the cost of keeping up to TRIM_THRESHOLD of freed memory in the process.
"""

from __future__ import annotations

import ctypes
import functools
import platform

# mallopt parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Blocks up to this size come from the heap and are reused: airbench's batch-1024
# activations are ~130 MB each. glibc's manual gives 32 MiB as the largest value on
# 64-bit systems; newer glibc accepts more, older refuses it, so that is the fallback.
MMAP_THRESHOLD = 1 << 30  # bytes
MMAP_THRESHOLD_FALLBACK = 32 << 20  # bytes
TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept instead of handed back to the OS


@functools.cache
def keep_freed_memory() -> bool:
    """Fix glibc's thresholds high in this process (once). Returns whether they were set:
    False where the C library is not glibc (macOS, musl), which keep their own policy."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mmap_set = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 or mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK) == 1
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mmap_set
