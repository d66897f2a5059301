"""The errors a user sees. Each message names the file, image id, annotation id or config key at fault and
says how to fix it; the CLIs print it as one line (gains.cli_errors) and exit non-zero.

Defined here, below every other module, so that any layer can raise them without importing another layer.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the file."""


class DataError(ValueError):
    """Invalid data set input; the message names the file / image id / annotation id and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model; the message names the keys."""


class EvaluationError(ValueError):
    """Invalid evaluation input (results or ground truth); the message names the ids and the fix."""
