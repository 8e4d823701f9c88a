"""minicpm-edge: MiniCPM checkpoints in, int4 phone artifacts out."""

__version__ = "0.1.0"
