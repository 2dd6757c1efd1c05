"""ModelConfig: every model hyperparameter in one frozen dataclass.

Variants (evaluation with memory disabled, another memory size, another kNN
backend) come from `config.replace(...)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import jax.numpy as jnp


class ConfigError(ValueError):
  """A ModelConfig field has an impossible value; the message names the field."""


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of the decoder and its kNN memory.

  The paper's size is `ModelConfig.paper()`: 12 layers, d_model 1024,
  8 heads x 128, MLP 4096, 32K vocab, memory at the 9th layer.
  """
  vocab_size: int = 260
  num_layers: int = 4
  d_model: int = 128
  num_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 512
  dropout_rate: float = 0.0
  dtype: str = "float32"        # compute dtype; softmax and loss stay float32
  param_dtype: str = "float32"
  segment_length: int = 512
  use_xl_cache: bool = True
  relative_position_buckets: int = 32
  relative_position_max_distance: int = 128
  # The T5 bias table starts at std 0.02. With L2-normalised q and k the content
  # logits are bounded, so locality has to come from this bias, which must be
  # learned faster than the other weights: TrainConfig.learning_rate_multipliers
  # (docs/results.md).
  tie_embeddings: bool = True
  # Local attention kernel: "auto" (cuDNN flash attention on GPU in bf16/fp16, else
  # einsum; $MEMORIZING_ATTENTION overrides auto), "einsum", "remat", "cudnn", "xla".
  attention: str = "auto"
  # Initial value of the learned per-head scale on normalised q.k logits.
  logit_scale_init: float = 0.0   # 0 means sqrt(head_dim)
  # kNN memory. Layer indices may be negative (-4 is the 9th of 12).
  memory_layers: Tuple[int, ...] = ()
  memory_size: int = 8192
  num_neighbors: int = 32
  memory_enabled: bool = True     # False: same parameters, memory always empty
  # Initial gate bias b_h (g = sigmoid(b_h)); 0 as in the paper. When adding memory
  # to a trained model (--init_from), a negative value (e.g. -3: g = 0.05) starts
  # the fine-tune from the trained model's own function.
  memory_gate_init: float = 0.0
  # How local and memory attention combine in a memory layer:
  #   "gate":  out = g * memory + (1 - g) * local, g = sigmoid(b_h) per head (the paper);
  #   "joint": one softmax over the local keys and the retrieved keys, the retrieved
  #            logits plus a learned per-head bias `memory_bias` (init memory_bias_init):
  #            each query decides how much goes to memory; with an empty memory the
  #            layer is exactly local attention (docs/results.md).
  memory_combine: str = "gate"
  # Relative position bias in the local attention of memory layers. meliad's
  # memory configs turn it off (disable_position_encoding_for_memory_layers), so
  # that a memory layer's local attention, like its memory attention, can only
  # match content: what its queries and keys learn locally then serves the
  # lookup in memory (docs/memory_diagnosis.md).
  memory_layer_position_bias: bool = True
  memory_bias_init: float = 0.0
  knn_backend: str = "exact"
  knn_options: Tuple[Tuple[str, Any], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "memory_layers", tuple(int(i) for i in self.memory_layers))
    if isinstance(self.knn_options, dict):
      object.__setattr__(self, "knn_options", tuple(sorted(self.knn_options.items())))
    self.validate()

  # --- checks -------------------------------------------------------------
  def validate(self) -> None:
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim",
                 "mlp_dim", "segment_length", "relative_position_buckets",
                 "relative_position_max_distance"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
    if self.d_model % self.num_heads:
      raise ConfigError(
          f"ModelConfig.num_heads={self.num_heads} does not divide "
          f"ModelConfig.d_model={self.d_model}")
    if self.memory_combine not in ("gate", "joint"):
      raise ConfigError(f"ModelConfig.memory_combine={self.memory_combine!r}; choose one of "
                        "gate, joint")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f"ModelConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}; choose one of {sorted(_DTYPES)}")
    if self.attention not in ("auto", "einsum", "remat", "cudnn", "xla"):
      raise ConfigError(f"ModelConfig.attention={self.attention!r}; choose one of "
                        "auto, einsum, remat, cudnn, xla")
    seen = set()
    for i in self.memory_layers:
      if not -self.num_layers <= i < self.num_layers:
        raise ConfigError(
            f"ModelConfig.memory_layers holds {i}, out of range for "
            f"num_layers={self.num_layers} (valid: {-self.num_layers}..{self.num_layers - 1})")
      j = i % self.num_layers
      if j in seen:
        raise ConfigError(f"ModelConfig.memory_layers names layer {j} twice")
      seen.add(j)
    if self.memory_layers:
      if self.num_neighbors <= 0:
        raise ConfigError(f"ModelConfig.num_neighbors must be > 0, got {self.num_neighbors}")
      if self.memory_size <= 0:
        raise ConfigError(f"ModelConfig.memory_size must be > 0, got {self.memory_size}")
      if self.num_neighbors > self.memory_size:
        raise ConfigError(
            f"ModelConfig.num_neighbors={self.num_neighbors} exceeds "
            f"ModelConfig.memory_size={self.memory_size}; a memory cannot return more "
            "neighbours than it holds")

  # --- derived values -----------------------------------------------------
  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def params_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def memory_layer_set(self) -> Tuple[int, ...]:
    """Memory layer indices normalised to 0..num_layers-1, sorted."""
    return tuple(sorted(i % self.num_layers for i in self.memory_layers))

  @property
  def initial_logit_scale(self) -> float:
    return self.logit_scale_init or float(self.head_dim) ** 0.5

  @property
  def knn_options_dict(self) -> dict:
    return dict(self.knn_options)

  @classmethod
  def paper(cls, **overrides) -> "ModelConfig":
    """The paper's 150M decoder: 12 x 1024, 8 heads x 128, MLP 4096, 32K vocab."""
    base = dict(vocab_size=32768, num_layers=12, d_model=1024, num_heads=8,
                head_dim=128, mlp_dim=4096, segment_length=512,
                memory_layers=(-4,), memory_size=65536, num_neighbors=32)
    base.update(overrides)
    return cls(**base)
