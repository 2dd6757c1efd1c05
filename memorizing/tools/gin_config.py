"""Gin at the edge: the configurable names and the parsing of gin files and bindings.

Reading a config imports the configs (memorizing/model/config.py) and gin only:
no training code, no TFDS. Gin files are searched in the working directory,
then in the project's configs/ folder.
"""
from __future__ import annotations

import logging
import threading
import os
import tokenize
from typing import List, Optional

import gin

from memorizing.errors import UsageError, UserError
from memorizing.model.config import ModelConfig, TrainConfig

def _config_dir() -> str:
  """configs/ of the repository (a source checkout or an editable install), else the
  copy installed inside the package (memorizing/configs/ in a wheel)."""
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  repository = os.path.join(os.path.dirname(package), "configs")
  if os.path.isfile(os.path.join(repository, "base.gin")):
    return repository
  return os.path.join(package, "configs")


CONFIG_DIR = _config_dir()

def _tolerant(exists):
  """`exists` returning False instead of raising TypeError.

  gin's second file reader looks an include such as 'data/python_stdlib.gin'
  up as package `data` on sys.path before gin tries the next search path; a
  plain directory of that name beside the script or in the working directory
  (`python -m ...`) is a namespace package without a file, and the check
  raised TypeError, so every config including 'data/...', 'models/...' or
  'memory/...' failed to parse there.
  """
  def check(path):
    try:
      return exists(path)
    except TypeError:
      return False
  check.tolerant = True
  return check


gin.config._FILE_READERS[:] = [   # private list, no public way to guard a reader
    (reader, exists if exists is os.path.isfile or getattr(exists, "tolerant", False)
     else _tolerant(exists))
    for reader, exists in gin.config._FILE_READERS]

# Registered once, by these names: gin files bind `ModelConfig.x` and `TrainConfig.x`.
_GIN_MODEL_CONFIG = gin.external_configurable(ModelConfig, "ModelConfig")
_GIN_TRAIN_CONFIG = gin.external_configurable(TrainConfig, "TrainConfig")


def find_config(path: str) -> Optional[str]:
  """`path` as given if it exists, else under configs/, else None."""
  if os.path.exists(path):
    return path
  in_configs = os.path.join(CONFIG_DIR, path)
  return in_configs if os.path.exists(in_configs) else None


# gin's configuration is global: one parse at a time (the sweep's job threads parse
# their configs concurrently; without this their search-path messages leaked and
# one thread's clear_config could land inside another's parse).
_GIN_LOCK = threading.RLock()


def parse_gin(gin_files: List[str], gin_params: List[str], before: Optional[str] = None):
  """Parses gin files and bindings; returns (ModelConfig, TrainConfig)."""
  with _GIN_LOCK:
    return _parse_gin(gin_files, gin_params, before)


def _parse_gin(gin_files: List[str], gin_params: List[str], before: Optional[str] = None):
  gin.clear_config()
  gin.add_config_file_search_path(os.getcwd())
  gin.add_config_file_search_path(CONFIG_DIR)
  files = ([before] if before else []) + list(gin_files)
  for f in files:
    if find_config(f) is None:
      raise UsageError(f"gin file {f!r} not found in . or {CONFIG_DIR}")
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)   # gin logs every search-path miss as an error
  try:
    gin.parse_config_files_and_bindings(files, gin_params, finalize_config=False)
    model_config, train_config = _GIN_MODEL_CONFIG(), _GIN_TRAIN_CONFIG()
  except UserError as e:
    # A config value names its own field; gin appends "In call to configurable ..."
    # to the message, which the one-line report drops.
    # gin re-raises the error as a subclass of its own ("ExceptionProxy").
    cls = type(e)
    if "ExceptionProxy" in getattr(cls.__init__, "__qualname__", ""):
      cls = cls.__bases__[0]
    raise cls(str(e).splitlines()[0]) from e
  except (ValueError, KeyError, TypeError, IOError, SyntaxError, tokenize.TokenError) as e:
    # Raised by gin's parser for a bad file or binding: the user's text is at fault.
    raise UsageError(f"gin configuration error: {str(e).splitlines()[0]}") from e
  finally:
    root.setLevel(level)
  return model_config, train_config
