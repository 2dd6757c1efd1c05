"""Errors a user can cause, as types; the bottom layer of the package (imports nothing).

Each is raised where its cause is known, with a message that names the cause
and the fix. The command-line edge (memorizing/tools/commands.py) reports a
`UserError` in one line and exits with status 1 (`Preempted`: 143); any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
  """Something the user can fix (a flag, a config value, data, a work directory)."""


class UsageError(UserError):
  """A bad flag, gin file or binding."""


class ConfigError(UserError, ValueError):
  """A ModelConfig/TrainConfig field (or kNN backend option) has an impossible value;
  the message names the field."""


class UnknownBackendError(ConfigError):
  """ModelConfig.knn_backend names no backend, or the backend cannot be loaded."""


class DatasetError(UserError, ValueError):
  """Unknown, unprepared or empty data set, or a bad data source or tokenizer."""


class SourceUnavailableError(UserError, RuntimeError):
  """The source of a corpus cannot be reached or read (network, files, packages)."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint or work directory cannot be used; the message names the cause."""


class TrainingError(UserError, RuntimeError):
  """A run cannot go on; the message says why and what is safe on disk."""


class Preempted(TrainingError):
  """SIGTERM arrived: the step in flight finished and a checkpoint was saved."""


class SweepError(UsageError, ValueError):
  """A bad grid or sweep flag; the message names the cause and the fix."""


class PlotError(UserError, RuntimeError):
  """Nothing to plot, or matplotlib is missing."""


class MissingFileError(UserError, FileNotFoundError):
  """A file the configuration names (a SentencePiece model, a source) does not exist."""
