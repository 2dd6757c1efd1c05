"""Prints the parameter count of a ModelConfig (default: the paper's 150M size).

  python scripts/count_params.py [--vocab_size 32768] [--num_layers 12] ...
"""
import argparse
import dataclasses

import jax

from memorizing.model.config import ModelConfig
from memorizing.model.decoder import count_params, init_params


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  paper = ModelConfig.paper()
  for f in ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "mlp_dim"):
    parser.add_argument(f"--{f}", type=int, default=getattr(paper, f))
  parser.add_argument("--untied", action="store_true", help="separate output embedding")
  args = parser.parse_args()
  changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)
             if hasattr(args, f.name)}
  config = paper.replace(tie_embeddings=not args.untied, **changes)
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  total = count_params(shapes)
  emb = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
  print(f"layers={config.num_layers} d_model={config.d_model} heads={config.num_heads}x{config.head_dim} "
        f"mlp={config.mlp_dim} vocab={config.vocab_size} memory_layers={config.memory_layer_set}")
  print(f"parameters without embeddings: {total - emb:,} ({(total - emb) / 1e6:.1f}M)")
  print(f"parameters in total:           {total:,} ({total / 1e6:.1f}M)")


if __name__ == "__main__":
  main()
