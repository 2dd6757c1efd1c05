"""memorizing-generate: sample from a trained model whose memory holds the prompt.

The prompt is read the way training and evaluation read a document: whole
segments through the Decoder (filling the XL caches and the kNN memory; a
prompt longer than the memory keeps its newest part, as the FIFO does), the
rest token by token through the incremental decoder (memorizing/model/
incremental.py), which then samples: each new token attends to the partial
current segment, the XL cache and the memory, and a full segment becomes the
XL cache and goes into the memory.

Python API:

    from memorizing.tools import generate
    gen = generate.Generator(model_config, params, backend)      # compiled once
    result = gen.generate(prompts [B, P] int, max_new_tokens=64, temperature=0.0)
    result.tokens, result.logprobs            # per row: generated ids, their log p

Rows are decoded in lockstep, all at one position of their segment, so a
batch runs as one group per prompt length: `gen.generate([ids_a, ids_b, ...])`
with prompts of different lengths gives each row what it gets alone (greedy),
in the order given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memorizing.data import tokenizers
from memorizing.errors import ConfigError, UsageError
from memorizing.knn import make_backend
from memorizing.knn_api import KNNBackend
from memorizing.model.config import ModelConfig
from memorizing.model.decoder import Decoder, init_carried_state
from memorizing.model.incremental import Stepper, init_decode_state
from memorizing.tools.gin_config import parse_gin
from memorizing.training import checkpoint

OPERATIVE_CONFIG = "operative_config.gin"


class PromptError(UsageError, ValueError):
  """An empty, unreadable or malformed prompt."""


@dataclasses.dataclass
class GenerationResult:
  tokens: List[List[int]]          # per row, the generated ids (up to and with eos)
  logprobs: List[List[float]]      # per row, log p of each generated id (temperature 1)
  prompt_tokens: int               # per row (the longest row's, for prompts of several lengths)
  prompt_seconds: float
  decode_seconds: float
  decode_steps: float              # per row (a mean over groups of several prompt lengths)

  prompt_lengths: Optional[List[int]] = None   # per row; None: all prompt_tokens

  @property
  def prompt_tokens_per_s(self) -> float:
    total = (sum(self.prompt_lengths) if self.prompt_lengths is not None
             else len(self.tokens) * self.prompt_tokens)
    return total / max(self.prompt_seconds, 1e-9)

  @property
  def decode_tokens_per_s(self) -> float:
    rows = len(self.tokens)
    return rows * self.decode_steps / max(self.decode_seconds, 1e-9)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
  if max_new_tokens <= 0:
    raise UsageError(f"--max_new_tokens must be > 0, got {max_new_tokens}")
  if temperature < 0:
    raise UsageError(f"--temperature must be >= 0, got {temperature}")
  if top_k < 0:
    raise UsageError(f"--top_k must be >= 0 (0: no limit), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise UsageError(f"--top_p must be in (0, 1], got {top_p}")


def _sample(logits, key, temperature, top_k, top_p):
  """logits [B, V] -> ids [B]: temperature, then top-k, then nucleus (top-p)."""
  logits = logits / temperature
  v = logits.shape[-1]
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  kth = jnp.take_along_axis(sorted_logits, jnp.clip(top_k - 1, 0, v - 1)[None, None]
                            .repeat(logits.shape[0], 0), axis=-1)
  logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs              # mass of the ids ranked above
  keep = before < top_p                                      # the first id is always kept
  cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1)


class Generator:
  """Jitted prompt and decode steps for one (config, params, backend)."""

  def __init__(self, config: ModelConfig, params, backend: Optional[KNNBackend]):
    self.config, self.params, self.backend = config, params, backend
    def prompt_segment(p, t, st, s):     # named: the profiler's module is jit_prompt_segment
      return Decoder(config, backend).apply({"params": p}, t, st, s)
    self._segment = jax.jit(prompt_segment, donate_argnums=2)   # the carried state
    self._stepper = Stepper(config, backend)

    def choose(logits, key, temperature, top_k, top_p, greedy):
      """-> ids [B] int32, their log p [B] (temperature 1), the next key: one dispatch."""
      key, sub = jax.random.split(key)
      if greedy:
        ids = jnp.argmax(logits, axis=-1)
      else:
        ids = _sample(logits, sub, temperature, top_k, top_p)
      ids = ids.astype(jnp.int32)
      lp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, None], axis=-1)[:, 0]
      return ids, lp, key

    self._choose = jax.jit(choose, static_argnames="greedy")

  def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, eos_id: Optional[int] = None,
               on_token: Optional[Callable[[int, int], None]] = None) -> GenerationResult:
    """prompts [B, P] ids, or a list of 1-D id sequences of any lengths -> GenerationResult.

    Temperature 0 is greedy (argmax, deterministic). `on_token(row, id)` is
    called for each generated id as soon as it is known. A row stops after
    `eos_id`; the call ends when every row has stopped or made max_new_tokens.
    Prompts of several lengths run as one lockstep group per length (each
    group sampled with `seed`); rows come back in the order given.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id)
    if not isinstance(prompts, np.ndarray) and len({len(p) for p in prompts}) > 1:
      return self._generate_by_length(list(prompts), max_new_tokens, on_token, **kwargs)
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or prompts.shape[1] == 0:
      raise PromptError("the prompt is empty: give at least one token per row")
    cfg = self.config
    if prompts.min() < 0 or prompts.max() >= cfg.vocab_size:
      raise PromptError(f"prompt ids must lie in [0, {cfg.vocab_size})")
    b, p = prompts.shape
    length = cfg.segment_length
    t0 = time.perf_counter()
    carried = init_carried_state(cfg, b)
    full = p // length
    logits = None
    for s in range(full):
      seg = jnp.asarray(prompts[:, s * length:(s + 1) * length], jnp.int32)
      logits, carried = self._segment(self.params, seg, carried, jnp.full((b,), s == 0))
    logits = None if logits is None else logits[:, -1]
    state = init_decode_state(cfg, b, carried)
    position = 0
    for t in range(full * length, p):
      logits, state = self._stepper.step(self.params, prompts[:, t], state, position)
      position = position % length + 1
    logits.block_until_ready()
    t1 = time.perf_counter()

    key = jax.random.PRNGKey(seed)
    tokens = [[] for _ in range(b)]
    logprobs = [[] for _ in range(b)]
    done = np.zeros((b,), bool)
    steps = 0
    temp = jnp.float32(temperature)
    k_arr, p_arr = jnp.int32(top_k), jnp.float32(top_p)
    for i in range(max_new_tokens):
      ids, lp, key = self._choose(logits, key, temp, k_arr, p_arr, greedy=temperature == 0)
      ids_host, lp_host = jax.device_get((ids, lp))
      steps += 1
      for r in range(b):
        if done[r]:
          continue
        tokens[r].append(int(ids_host[r]))
        logprobs[r].append(float(lp_host[r]))
        if on_token is not None:
          on_token(r, int(ids_host[r]))
        if eos_id is not None and eos_id >= 0 and ids_host[r] == eos_id:
          done[r] = True
      if done.all() or i == max_new_tokens - 1:
        break
      logits, state = self._stepper.step(self.params, ids, state, position)
      position = position % length + 1
    t2 = time.perf_counter()
    return GenerationResult(tokens=tokens, logprobs=logprobs, prompt_tokens=p,
                            prompt_seconds=t1 - t0, decode_seconds=t2 - t1, decode_steps=steps)


  def _generate_by_length(self, prompts: List, max_new_tokens: int,
                          on_token: Optional[Callable[[int, int], None]], **kwargs
                          ) -> GenerationResult:
    """Rows of several prompt lengths: one lockstep group per length, merged."""
    rows = [np.asarray(p).reshape(-1) for p in prompts]
    groups = {}
    for r, ids in enumerate(rows):
      groups.setdefault(len(ids), []).append(r)
    tokens, logprobs = [None] * len(rows), [None] * len(rows)
    prompt_s = decode_s = 0.0
    row_steps = 0
    for length in sorted(groups):
      members = groups[length]
      relay = None if on_token is None else (
          lambda i, t, members=members: on_token(members[i], t))
      part = self.generate(np.stack([rows[r] for r in members]), max_new_tokens,
                           on_token=relay, **kwargs)
      for i, r in enumerate(members):
        tokens[r], logprobs[r] = part.tokens[i], part.logprobs[i]
      prompt_s += part.prompt_seconds
      decode_s += part.decode_seconds
      row_steps += len(members) * part.decode_steps
    # decode_steps: the mean per row, so that decode_tokens_per_s counts every row's steps.
    return GenerationResult(tokens=tokens, logprobs=logprobs,
                            prompt_tokens=max(len(ids) for ids in rows),
                            prompt_seconds=prompt_s, decode_seconds=decode_s,
                            decode_steps=row_steps / len(rows),
                            prompt_lengths=[len(ids) for ids in rows])


def generate(model_config: ModelConfig, params, prompts, max_new_tokens: int,
             backend: Optional[KNNBackend] = None, **kwargs) -> GenerationResult:
  """One-call API: a Generator (and, by default, a kNN backend made and closed here)."""
  own = backend is None and bool(model_config.memory_layers and model_config.memory_enabled)
  if own:
    backend = make_backend(model_config)
  try:
    return Generator(model_config, params, backend).generate(prompts, max_new_tokens, **kwargs)
  finally:
    if own:
      backend.close()


# --- command line --------------------------------------------------------------------
def load_run(workdir: str, gin_params: Sequence[str] = (), checkpoint_step: Optional[int] = None,
             memory: str = "on", gin_files: Sequence[str] = ()):
  """(model_config, train_config, params, step) of a work directory, as memorizing-eval reads it."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  operative = os.path.join(workdir, OPERATIVE_CONFIG)
  if not os.path.isdir(workdir):
    raise UsageError(f"work directory {workdir} does not exist")
  model_config, train_config = parse_gin(list(gin_files), list(gin_params),
                                         before=operative if os.path.exists(operative) else None)
  if memory == "off":
    model_config = model_config.replace(memory_enabled=False)
  params, step = checkpoint.load_params(workdir, checkpoint_step)
  checkpoint.check_params_fit(model_config, params, f"checkpoint {step} in {workdir}")
  return model_config, train_config, params, step


def read_prompt(prompt_file: Optional[str]) -> str:
  if prompt_file is None:
    text = sys.stdin.read()
  else:
    try:
      with open(prompt_file, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    except OSError as e:
      raise PromptError(f"cannot read prompt file {prompt_file}: {e.strerror}") from e
  if not text:
    raise PromptError("the prompt is empty: give text in --prompt_file or on stdin")
  return text


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="memorizing-generate",
      description="Sample a continuation of a prompt; the memory holds the prompt.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--checkpoint_step", type=int, default=None, help="default: latest")
  parser.add_argument("--prompt_file", default=None, help="default: read stdin")
  parser.add_argument("--max_new_tokens", type=int, required=True)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  parser.add_argument("--top_k", type=int, default=0, help="0: no limit")
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--memory", choices=("on", "off"), default="on")
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--output", default=None, help="write tokens and log-probabilities (JSON)")
  args = parser.parse_args(list(argv))
  check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
  model_config, train_config, params, step = load_run(
      args.workdir, args.gin_param, args.checkpoint_step, args.memory, args.gin_file)
  tok = tokenizers.get_tokenizer(train_config.tokenizer)
  if tok.vocab_size > model_config.vocab_size:
    raise ConfigError(f"tokenizer {train_config.tokenizer!r} has {tok.vocab_size} ids but "
                      f"ModelConfig.vocab_size is {model_config.vocab_size}")
  text = read_prompt(args.prompt_file)
  ids = np.asarray(tok.encode(text), np.int32)
  if ids.size == 0:
    raise PromptError("the prompt encodes to no tokens")
  eos = getattr(tok, "eos_id", None)

  shown = {"ids": [], "text": ""}

  def stream(row, token):
    shown["ids"].append(token)
    text_now = tok.decode(shown["ids"])
    if text_now.startswith(shown["text"]):
      sys.stdout.write(text_now[len(shown["text"]):])
    else:
      sys.stdout.write(text_now)
    sys.stdout.flush()
    shown["text"] = text_now

  uses_memory = bool(model_config.memory_layers and model_config.memory_enabled)
  backend = make_backend(model_config) if uses_memory else None
  try:
    result = Generator(model_config, params, backend).generate(
        ids[None], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, eos_id=eos, on_token=stream)
  finally:
    if backend is not None:
      backend.close()
  sys.stdout.write("\n")
  sys.stdout.flush()
  print(f"prompt: {result.prompt_tokens} tokens, {result.prompt_tokens_per_s:.1f} tokens/s; "
        f"decode: {result.decode_steps} tokens, {result.decode_tokens_per_s:.1f} tokens/s "
        f"(memory {'on' if uses_memory else 'off'}, checkpoint {step}, compile included)",
        file=sys.stderr)
  if args.output:
    out = {"workdir": os.path.abspath(args.workdir), "checkpoint_step": step,
           "memory": args.memory, "prompt_tokens": result.prompt_tokens,
           "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
           "seed": args.seed, "tokens": result.tokens[0], "logprobs": result.logprobs[0],
           "text": tok.decode(result.tokens[0]),
           "prompt_tokens_per_s": result.prompt_tokens_per_s,
           "decode_tokens_per_s": result.decode_tokens_per_s}
    with open(args.output, "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {args.output}", file=sys.stderr)
  return 0
