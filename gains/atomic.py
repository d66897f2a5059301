"""Atomic file writes: a temporary file beside the target, fsync, then rename, so readers never see half a
file and a failure leaves the old file (or none) in place. No torch import: exports and map files use it."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], None]) -> Path:
    """Call `write_fn(tmp_path)` on a temp file in `path`'s folder (created if needed), then rename it over
    `path`; on any failure the temp file is removed and `path` is untouched. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace a text file atomically (last_checkpoint, metrics.jsonl rewrites, json outputs)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    return atomic_write(path, write)


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """json.dump `obj` compactly into `path` atomically: readers never see half a file."""
    return write_text_atomic(path, json.dumps(obj, separators=(",", ":")))
