"""Memorizing Transformers (Wu et al., ICLR 2022) in JAX/Flax.

Layers, each importing only those before it (docs/design.md; tests/test_layering.py):
  errors -> knn_api -> model/ -> knn/ -> data/ -> training/ -> tools/ -> cli
(data/ imports nothing of the model or the kNN backends.)
"""

__version__ = "0.1.0"
