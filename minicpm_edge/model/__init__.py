"""The MiniCPM model: config, lazy checkpoint reader, tokenizer, torch forward."""

from .checkpoint import Checkpoint, all_finite
from .config import ModelConfig, parse_config
from .forward import MiniCPM, load_layer, load_model
from .tokenizer import Tokenizer

__all__ = ["Checkpoint", "all_finite", "ModelConfig", "parse_config", "MiniCPM", "load_layer", "load_model", "Tokenizer"]
