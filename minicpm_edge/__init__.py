"""minicpm-edge: MiniCPM checkpoints in, int4 phone artifacts out."""

import os

# MKL may otherwise run a matrix multiply on fewer threads than torch asks for when the machine is busy, which
# changes its summation order: a quantisation resumed after an interruption would then not be bit-identical.
# Set before torch (and its MKL) is first imported; a user's own setting wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

__version__ = "0.1.0"
