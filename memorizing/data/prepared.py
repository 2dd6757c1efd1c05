"""Where prepared data sets live: the data directory and a data set's prepared version.

Below registry.py and official.py, which both look prepared directories up.
"""
from __future__ import annotations

import json
import os
from typing import Optional


def default_data_dir() -> str:
  """$MEMORIZING_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(os.environ.get("MEMORIZING_DATA_DIR", "~/tensorflow_datasets"))


def find_prepared(data_dir: str, tfds_name: str) -> Optional[str]:
  """The directory `data_dir/tfds_name/VERSION` of the highest prepared version
  (one holding dataset_info.json), or None."""
  base = os.path.join(os.path.expanduser(data_dir), *tfds_name.split("/"))
  if not os.path.isdir(base):
    return None
  versions = []
  for v in os.listdir(base):
    if os.path.exists(os.path.join(base, v, "dataset_info.json")):
      try:
        versions.append((tuple(int(x) for x in v.split(".")), v))
      except ValueError:
        continue
  return os.path.join(base, max(versions)[1]) if versions else None


def file_format(builder_dir: str) -> str:
  with open(os.path.join(builder_dir, "dataset_info.json")) as f:
    return json.load(f).get("fileFormat", "tfrecord")
