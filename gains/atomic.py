"""Atomic file writes: a temporary file beside the target, fsync, then rename, so readers never see half a
file and a failure leaves the old file (or none) in place; folders (data sets) likewise. No torch import.

Files get the mode open() gives a new file, 0o666 minus the umask (-rw-r--r-- under umask 022): the temp
file of tempfile.mkstemp is 0o600 and the rename would carry that mode over, leaving results that a colleague
on a shared server, or Fiji run as another user, cannot read."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc/self/status, kernel >= 4.7);
    elsewhere set and restored at once (os.umask is the only portable query)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """Permission bits open() would give a new file now: 0o666 & ~umask (0o644 under umask 022)."""
    return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], None]) -> Path:
    """Call `write_fn(tmp_path)` on a temp file in `path`'s folder (created if needed), then rename it over
    `path`; on any failure the temp file is removed and `path` is untouched. Returns `path`.

    The file ends with new_file_mode() (0o666 minus the umask), as if open() had created it, also when it
    replaces a file of another mode (files left 0o600 by earlier versions become readable again)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, new_file_mode())  # after write_fn: a writer that re-creates the file gets the mode too
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


def atomic_folder(path: str | os.PathLike, fill_fn: Callable[[Path], None],
                  already_done: Callable[[], bool] | None = None) -> Path:
    """Build the folder `path` atomically: `fill_fn(tmp)` writes into a new sibling folder, which is then
    renamed to `path` (an existing `path` is moved aside first and deleted after: a rename onto a non-empty
    folder is refused). When another process created `path` in the meantime (a second rank) and
    `already_done()` says its content is what was wanted, this copy is discarded. On any failure the
    temporary folder is removed and `path` is left as it was. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        fill_fn(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{tag}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(path)
            except OSError:  # created meanwhile by another process
                if already_done is None or not already_done():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
