"""minicpm-edge: MiniCPM checkpoints in, int4 phone artifacts out."""

import os

# MKL may otherwise run a matrix multiply on fewer threads than torch asks for when the machine is busy, which
# changes its summation order: a quantisation resumed after an interruption would then not be bit-identical.
# Set before torch (and its MKL) is first imported; a user's own setting wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
# On a busy machine (other processes on the cores torch uses) OpenMP's default wait policy keeps idle worker threads
# spinning between parallel regions, where they take the core from the thread with the work: one small tensor
# operation measured 16 ms instead of 15 us on 2 threads under load. Passive waiting costs microseconds per region.
# llama.cpp's ggml shares that OpenMP runtime (torch's libgomp, loaded first) and waits at a few hundred barriers per
# decoded token: passively that decode measured 10x slower (bundled GGUF, 2 threads: 320 against 2960-4800 tok/s), so
# `bench run` times llama.cpp in a child process at OpenMP's default (MINICPM_EDGE_OMP_DEFAULT=1 there).
OMP_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in os.environ and os.environ.get("MINICPM_EDGE_OMP_DEFAULT") != "1"
if OMP_POLICY_SET_HERE:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
# torch's CPU allocator can back tensors of 2 MiB and more with transparent huge pages (THP_MEM_ALLOC_ENABLE=1, torch's
# own switch; a user may set it). Not set here: a huge page's first touch costs more than its 512 small pages' on
# some machines (a virtual machine on AMD EPYC: 100 MB faulted in 167 ms against 29 ms), and the quantiser makes
# many fresh large tensors. Measured: SmolLM2-135M Q4_K_M there 103 s with it, 86-94 s without; a
# MiniCPM-2B-shaped layer on a Xeon (AMX) 5% faster with it.

__version__ = "0.1.0"
