"""minicpm-edge: MiniCPM checkpoints in, int4 phone artifacts out."""

import os

# MKL may otherwise run a matrix multiply on fewer threads than torch asks for when the machine is busy, which
# changes its summation order: a quantisation resumed after an interruption would then not be bit-identical.
# Set before torch (and its MKL) is first imported; a user's own setting wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
# On a busy machine (other processes on the cores torch uses) OpenMP's default wait policy keeps idle worker threads
# spinning between parallel regions, where they take the core from the thread with the work: one small tensor
# operation measured 16 ms instead of 15 us on 2 threads under load. Passive waiting costs microseconds per region.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torch's CPU allocator backs tensors of 2 MiB and more with transparent huge pages (madvise; a no-op where the kernel
# has THP off): the quantiser's large copies, transposes and gathers of fresh tensors fault 512x fewer pages
# (a MiniCPM-2B-shaped layer: 5% faster end to end, the copies up to 2x). Read by torch at its first allocation.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
