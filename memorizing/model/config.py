"""ModelConfig and TrainConfig: every hyperparameter in two frozen dataclasses.

ModelConfig is the model (passed to every module); TrainConfig is everything
about a run that is not the model (data, optimizer, schedule, checkpoints,
evaluation). Variants (evaluation with memory disabled, another memory size,
another kNN backend) come from `config.replace(...)`. Gin binds both by name
(`ModelConfig.x = ...`, `TrainConfig.x = ...`) at the command-line edge only.

This module imports no training code and no data code, so reading a config is
cheap.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Tuple

import jax.numpy as jnp

from memorizing.errors import ConfigError

__all__ = ["ConfigError", "ModelConfig", "TrainConfig"]


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def check_field_types(config) -> None:
  """Raises ConfigError naming the field whose value has the wrong type (for
  fields annotated int, float, bool, str or Tuple), e.g. memory_size = 'big'."""
  cls = type(config).__name__
  for f in dataclasses.fields(config):
    value, kind = getattr(config, f.name), str(f.type)
    if kind.startswith("Optional[") and value is None:
      continue
    kind = kind[len("Optional["):-1] if kind.startswith("Optional[") else kind
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}.get(kind)
    if ok is None and kind.startswith("Tuple"):
      ok = lambda v: isinstance(v, (tuple, list))
      kind = "tuple"
    if ok is not None and not ok(value):
      article = "an" if kind == "int" else "a"
      raise ConfigError(f"{cls}.{f.name} must be {article} {kind}, got {value!r}")


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
  # einsum), "einsum", "remat", "cudnn", "xla" (memorizing/model/layers.py).
  attention: str = "auto"
  # Gradient of the table lookups (token embedding, position-bias table):
  # "one_hot" (a one-hot matmul: no atomics, deterministic, its cost independent
  # of the tokens), "scatter" (XLA's scatter-add: on a GPU, repeated ids contend,
  # so a step on real text is 2-8x a step on uniform random ids), "auto"
  # (one_hot where the one-hot matrix has at most 2**30 entries on a GPU, 2**26
  # elsewhere: layers.one_hot_gradient_limit). The same
  # gradient either way, up to summation order: not part of a recipe.
  gather_gradient: str = "auto"
  # How a memory layer attends over its k retrieved pairs: "einsum" (gathers
  # them into [B,H,L,k,D] arrays, then batched dots), "pallas" (fused Pallas
  # kernels that read the rows from the memory by index: no [B,H,L,k,D] array;
  # GPU, interpret mode elsewhere), "auto" (the default:
  # memory_attention.retrieved_attention_implementation). The same result up
  # to summation order: not part of a recipe.
  retrieved_attention: str = "auto"
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
  # Relative position bias in the local attention of memory layers. Off, as in
  # meliad's memory configs (disable_position_encoding_for_memory_layers): a
  # memory layer's local attention, like its memory attention, can then only
  # match content, so what its queries and keys learn locally serves the lookup
  # in memory. With it on, the memory lost to Transformer-XL in two of three
  # runs on two corpora; off, it won in 11 of 12 (corpus, seed) pairs on four
  # corpora, and in all 12 with the memory layer one lower (-3 of 6, the Table-4
  # protocol's default; docs/memory_diagnosis.md).
  memory_layer_position_bias: bool = False
  memory_bias_init: float = 0.0
  knn_backend: str = "exact"
  knn_options: Tuple[Tuple[str, Any], ...] = ()

  def __post_init__(self):
    check_field_types(self)
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
    if self.gather_gradient not in ("auto", "one_hot", "scatter"):
      raise ConfigError(f"ModelConfig.gather_gradient={self.gather_gradient!r}; choose one of "
                        "auto, one_hot, scatter")
    if self.retrieved_attention not in ("auto", "einsum", "pallas"):
      raise ConfigError(f"ModelConfig.retrieved_attention={self.retrieved_attention!r}; choose "
                        "one of auto, einsum, pallas")
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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything about a run that is not the model (gin: `TrainConfig.x = ...`)."""
  dataset: str = "python_stdlib"
  data_dir: Optional[str] = None        # None: $MEMORIZING_DATA_DIR or ~/tensorflow_datasets
  tokenizer: str = "bytes"              # "bytes" or a SentencePiece .model path
  train_split: str = "train"
  eval_split: str = "validation"
  batch_size: int = 8                   # global rows (documents streamed in parallel)
  eval_batch_size: int = 8
  num_steps: int = 1000
  optimizer: str = "adafactor"          # "adafactor" (paper) or "adamw"
  schedule: str = "rsqrt"               # "rsqrt": linear warmup then rsqrt decay; "cosine"
  learning_rate: float = 1.0            # rsqrt: lr * min(1, s/w) / sqrt(max(s, w)); adamw: peak
  warmup_steps: int = 1000
  weight_decay: float = 0.0
  grad_clip_norm: float = 1.0           # 0 disables clipping
  # Per-parameter learning-rate table: (regex, multiplier) pairs, matched with
  # re.search against the parameter path ("block_4/attention/memory_gate"); the
  # first match wins, unmatched parameters get 1, multiplier 0 freezes. With
  # L2-normalised q and k, locality comes from the T5 bias, learned 100x faster
  # (docs/results.md); the memory gate/bias are per-head scalars like it.
  learning_rate_multipliers: Tuple[Tuple[str, float], ...] = (
      ("relative_position_bias", 100.0), ("memory_gate|memory_bias", 100.0))
  memory_signals: bool = True           # gate, memory mass, distances, similarity, recall
  seed: int = 0
  shuffle_documents: bool = True        # seeded order of whole documents (never inside one)
  log_every: int = 50
  eval_every: int = 0                   # 0: only at the end
  eval_max_documents: int = 16
  eval_max_document_tokens: int = 0     # >0: evaluate only each document's first N tokens
  final_eval: bool = True               # evaluate with memory and with memory disabled at the end
  checkpoint_every: int = 500           # 0: only at the end
  keep_checkpoints: int = 3
  save_carried_state: bool = True       # False: resume restarts each row at its next document
  nan_policy: str = "stop"              # "stop" or "skip" (skip also drops that step's memory update)
  # With nan_policy = 'skip', training stops (TrainingError) once more steps than
  # this have been skipped; -1: max(5, num_steps // 100).
  max_skipped_steps: int = -1
  multihost: bool = False               # call jax.distributed.initialize()
  coordinator_address: Optional[str] = None   # multihost without a cluster manager:
  num_processes: Optional[int] = None         #   "host:port", process count and this
  process_id: Optional[int] = None            #   process's id (else auto-detected)
  progress_bar: bool = True
  prefetch: int = 2
  device_memory_gib: float = 0.0        # per-device budget for the memory-fit check; 0: what
                                        #   the device reports (on CPU: host RAM)

  def __post_init__(self):
    check_field_types(self)
    choices = {"optimizer": ("adafactor", "adamw"), "schedule": ("rsqrt", "cosine"),
               "nan_policy": ("stop", "skip")}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}; choose one of {allowed}")
    for name in ("batch_size", "eval_batch_size", "num_steps", "log_every", "keep_checkpoints"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
    table = tuple(tuple(entry) for entry in self.learning_rate_multipliers)
    for entry in table:
      if len(entry) != 2 or not isinstance(entry[0], str):
        raise ConfigError("TrainConfig.learning_rate_multipliers holds (regex, multiplier) pairs, "
                         f"got {entry!r}")
      try:
        re.compile(entry[0])
      except re.error as e:
        raise ConfigError(f"TrainConfig.learning_rate_multipliers: bad regex {entry[0]!r}: {e}")
      if not (isinstance(entry[1], (int, float)) and entry[1] >= 0):
        raise ConfigError(f"TrainConfig.learning_rate_multipliers: multiplier of {entry[0]!r} "
                         f"must be a number >= 0, got {entry[1]!r}")
    object.__setattr__(self, "learning_rate_multipliers", table)

  def replace(self, **changes) -> "TrainConfig":
    return dataclasses.replace(self, **changes)
