"""Plots of the Table 4 reproduction from run_table4.py's JSON (matplotlib, Agg).

    python scripts/plot_repro.py docs/results/repro_table4_h200_4000steps.json --out docs/img

Writes repro_ppl_vs_memory.png (validation perplexity against memory size:
XL is memory 0; the 8K model evaluated with 65K memory as a separate point),
repro_ppl_by_position.png (perplexity by the target's position in its
document, one line per row) and repro_train_loss.png (train loss per step).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROW_ORDER = ["no_xl", "xl", "mem1536", "mem8192", "mem65536"]
LABELS = {"no_xl": "no XL, no memory", "xl": "XL", "mem1536": "XL + 1536",
          "mem8192": "XL + 8192", "mem65536": "XL + 65536",
          "finetune_xl_mem8192": "XL fine-tuned + 8192", "finetune_xl_control": "XL fine-tuned"}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("results", help="run_table4.py JSON")
  ap.add_argument("--out", required=True, help="folder for the PNG files")
  args = ap.parse_args(argv)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  with open(args.results) as f:
    jobs = json.load(f)["jobs"]
  res = lambda name, variant="with_memory": jobs.get(name, {}).get("results", {}).get(variant)
  os.makedirs(args.out, exist_ok=True)
  written = []

  # Perplexity vs memory size.
  fig, ax = plt.subplots(figsize=(5, 3.4))
  xs, ys = [], []
  for name, size in (("xl", 0), ("mem1536", 1536), ("mem8192", 8192), ("mem65536", 65536)):
    r = res(name)
    if r:
      xs.append(max(size, 512))  # XL on a log axis: plotted at 512 (its cache length)
      ys.append(r["perplexity"])
  ax.plot(xs, ys, "o-", label="trained and evaluated with that memory")
  r = res("mem8192_eval65536")
  if r:
    ax.plot([65536], [r["perplexity"]], "s", label="8K model, 65K memory at eval")
  r = res("no_xl")
  if r:
    ax.axhline(r["perplexity"], color="gray", ls=":", label="no XL, no memory")
  ax.set_xscale("log", base=2)
  ax.set_xticks([512, 1536, 8192, 65536], ["XL only", "1536", "8192", "65536"])
  ax.set_xlabel("kNN memory size (per row and head)")
  ax.set_ylabel("validation perplexity (bytes)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(args.out, "repro_ppl_vs_memory.png")
  fig.savefig(path, dpi=110)
  written.append(path)

  # Perplexity by position bucket.
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for name in ROW_ORDER + ["finetune_xl_mem8192", "finetune_xl_control"]:
    r = res(name)
    if not r:
      continue
    buckets = [k[len("perplexity_"):] for k in r if k.startswith("perplexity_")]
    ax.plot(range(len(buckets)), [r["perplexity_" + b] for b in buckets], marker="o",
            label=LABELS.get(name, name), ls="--" if name.startswith("finetune") else "-")
    ax.set_xticks(range(len(buckets)), buckets)
  ax.set_xlabel("target position in its document (tokens = bytes)")
  ax.set_ylabel("validation perplexity")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(args.out, "repro_ppl_by_position.png")
  fig.savefig(path, dpi=110)
  written.append(path)

  # Train loss.
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for name in ROW_ORDER:
    log = jobs.get(name, {}).get("train_log")
    if log:
      ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=LABELS[name])
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (nats per byte)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(args.out, "repro_train_loss.png")
  fig.savefig(path, dpi=110)
  written.append(path)
  print("\n".join(written))
  return 0


if __name__ == "__main__":
  sys.exit(main())
