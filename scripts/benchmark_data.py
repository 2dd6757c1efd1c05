"""Input pipeline throughput on the CPU: batches/s of B x L token segments.

  python scripts/benchmark_data.py                       # B=8, L=512, python_stdlib train
  python scripts/benchmark_data.py --spm_model my.model --batches 4000

Measures DocumentStream alone and behind Prefetch, with the byte tokenizer and
a SentencePiece model (trained on the corpus and cached under
DATA_DIR/tokenizers/ when --spm_model is not given). Prints a table and writes JSON.
"""
import argparse
import json
import os
import platform
import sys
import time

from memorizing.data import (ByteTokenizer, DocumentStream, Prefetch, SentencePieceTokenizer,
                             load_documents, registry)
from memorizing.data.tokenizers import train_sentencepiece


def measure(make_stream, batches: int, warmup: int = 20, step_s: float = 0.005,
            step_batches: int = 300) -> dict:
  """Batches/s of `batches` batches after `warmup` (time to first batch reported
  apart), then the mean wait for a batch when each takes a `step_s` device step."""
  t0 = time.perf_counter()
  stream = make_stream()
  next(stream)
  first = time.perf_counter() - t0
  for _ in range(warmup):
    next(stream)
  t0 = time.perf_counter()
  weights = 0.0
  for _ in range(batches):
    weights += float(next(stream)["weights"].sum())
  dt = time.perf_counter() - t0
  # With a simulated device step (sleep releases the GIL like a jitted step):
  # how long the trainer would wait for data per batch.
  wait = 0.0
  for _ in range(step_batches):
    time.sleep(step_s)
    t1 = time.perf_counter()
    next(stream)
    wait += time.perf_counter() - t1
  if hasattr(stream, "close"):
    stream.close()
  return {"batches_per_s": batches / dt, "target_tokens_per_s": weights / dt,
          "first_batch_s": first, "batches": batches,
          "wait_ms_per_batch_with_step": 1000 * wait / step_batches, "step_ms": 1000 * step_s}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="python_stdlib")
  p.add_argument("--split", default="train")
  p.add_argument("--data_dir", default=registry.default_data_dir())
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--segment_length", type=int, default=512)
  p.add_argument("--batches", type=int, default=3000)
  p.add_argument("--step_ms", type=float, default=5.0, help="simulated device step")
  p.add_argument("--spm_model", help="SentencePiece .model (default: train an 8K one, cached)")
  p.add_argument("--spm_vocab_size", type=int, default=8000)
  p.add_argument("--output", default="workdirs/benchmark_data.json")
  args = p.parse_args(argv)

  docs = load_documents(args.dataset, args.split, args.data_dir)
  spm_model = args.spm_model or os.path.join(
      os.path.expanduser(args.data_dir), "tokenizers", f"{args.dataset}_{args.spm_vocab_size}.model")
  if not os.path.exists(spm_model):
    print(f"training {spm_model} (once)...", flush=True)
    t0 = time.perf_counter()
    train_sentencepiece((docs[i] for i in range(len(docs))), spm_model, args.spm_vocab_size,
                        max_bytes=8_000_000)
    print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
  tokenizers = {"bytes": ByteTokenizer(), "sentencepiece": SentencePieceTokenizer(spm_model)}
  sample = [docs[i] for i in range(0, len(docs), max(1, len(docs) // 8))]

  rows = []
  for tok_name, tok in tokenizers.items():
    bpt = tok.bytes_per_token(sample)
    for prefetch in (0, 4, 64):
      def make_stream():
        s = DocumentStream(docs, tok, args.batch_size, args.segment_length, shuffle_seed=0,
                           repeat=True)
        return Prefetch(s, prefetch) if prefetch else s
      r = measure(make_stream, args.batches, step_s=args.step_ms / 1000)
      r.update(tokenizer=tok_name, prefetch=prefetch, bytes_per_token=bpt,
               vocab_size=tok.vocab_size)
      rows.append(r)

  print(f"\n{args.dataset}/{args.split}, B={args.batch_size} x L={args.segment_length}, "
        f"{args.batches} batches, {os.cpu_count()} CPU cores, Python {platform.python_version()}")
  print(f"{'tokenizer':<14} {'prefetch':>8} {'batches/s':>10} {'target tok/s':>13} "
        f"{'first batch s':>13} {'bytes/token':>11} {'wait ms/step':>12}")
  for r in rows:
    print(f"{r['tokenizer']:<14} {r['prefetch']:>8} {r['batches_per_s']:>10.0f} "
          f"{r['target_tokens_per_s']:>13,.0f} {r['first_batch_s']:>13.3f} {r['bytes_per_token']:>11.2f} "
          f"{r['wait_ms_per_batch_with_step']:>12.3f}")
  print(f"(wait ms/step: mean time next() blocks when every batch is followed by a "
        f"{args.step_ms:g} ms simulated device step)")
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump({"dataset": args.dataset, "split": args.split, "batch_size": args.batch_size,
               "segment_length": args.segment_length, "cpu_count": os.cpu_count(),
               "spm_model": spm_model, "results": rows}, f, indent=2)
  print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
