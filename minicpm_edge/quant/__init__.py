"""Quantisation: the grid and packing, the per-matrix GPTQ solver, the layer-sequential driver, the GPTQ checkpoint."""

from .grid import QuantSpec
from .gptq import GPTQ, QuantResult, rtn

__all__ = ["QuantSpec", "GPTQ", "QuantResult", "rtn"]
