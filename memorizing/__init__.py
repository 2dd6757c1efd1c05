"""Memorizing Transformers (Wu et al., ICLR 2022) in JAX/Flax."""
from memorizing.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig"]
__version__ = "0.1.0"
