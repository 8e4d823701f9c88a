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

__version__ = "0.1.0"
