"""The errors a user sees. Each message names the file, image id, annotation id or config key at fault and
says how to fix it; the CLIs print it as one line (gains.cli_errors) and exit non-zero.

Defined here, below every other module, so that any layer can raise them without importing another layer.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the file."""


class DataError(ValueError):
    """Invalid input data (data set, ground-truth or results json, image, map file); the message names the
    file / image id / annotation id / result index and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model; the message names the keys."""


class EvaluationError(ValueError):
    """An evaluation setting that does not fit (aji_mode, max_dets, a split whose categories differ from the
    checkpoint's); the message names the key and the fix. Malformed ground-truth or results files are a
    DataError (gains.annotations.check_coco_gt / check_coco_results), whichever entry point reads them."""
