"""gains.atomic: whole files or none, and files a colleague can read (the mode open() would give them)."""
from __future__ import annotations

import os
import stat
from collections import Counter

import numpy as np
import pytest
import torch

from gains import atomic
from gains.atomic import atomic_folder, atomic_write, new_file_mode, write_json_atomic, write_text_atomic
from gains.checkpoint import save_checkpoint
from gains.config import dump_config
from gains.exports import write_imagej_rois, write_instances_npz, write_label_image
from gains.instances import CropMasks
from gains.train_log import MetricsLog


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    try:
        yield lambda value: os.umask(value)
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_written_files_get_the_umask_mode_of_open(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as f:  # the oracle: what open() gives a new file
        f.write("x")
    assert new_file_mode() == mode(tmp_path / "plain.txt") == 0o666 & ~mask
    assert mode(write_text_atomic(tmp_path / "a.txt", "a")) == 0o666 & ~mask
    assert mode(write_json_atomic(tmp_path / "results.json", {"a": 1})) == 0o666 & ~mask


def test_every_writer_of_results_gives_readable_files(tmp_path, umask):
    """Checkpoints, config.yaml, metrics.jsonl, results json, label TIFF, ROI zip and npz: -rw-r--r-- under
    umask 022 (they were -rw------- when the temp file's mode survived the rename)."""
    umask(0o022)
    masks = CropMasks.from_dense(np.eye(6, dtype=bool)[None] | np.eye(6, dtype=bool)[None, ::-1])
    save_checkpoint({"model": {"w": torch.zeros(2)}}, tmp_path / "model_final.pth")
    dump_config({"a": 1}, tmp_path / "config.yaml")
    MetricsLog(tmp_path / "metrics.jsonl", start_iter=0, enabled=True)
    write_json_atomic(tmp_path / "results.json", [])
    write_label_image(tmp_path / "x_labels.tif", masks)
    write_imagej_rois(tmp_path / "x_rois.zip", masks)
    write_instances_npz(tmp_path / "x.npz", masks, [1.0], [1], np.zeros((1, 4)))
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["config.yaml", "metrics.jsonl", "model_final.pth", "results.json", "x.npz", "x_labels.tif",
                       "x_rois.zip"]
    assert {p.name: oct(mode(p)) for p in tmp_path.iterdir()} == {name: oct(0o644) for name in written}


def test_a_replaced_private_file_becomes_readable_and_the_umask_is_untouched(tmp_path, umask):
    umask(0o002)
    path = tmp_path / "metrics.json"
    path.write_text("old")
    os.chmod(path, 0o600)  # as left by earlier versions
    write_text_atomic(path, "new")
    assert mode(path) == 0o664 and path.read_text() == "new"
    assert os.umask(0o002) == 0o002  # reading the umask left it as it was


def test_umask_fallback_without_proc(tmp_path, umask, monkeypatch):
    """Where /proc/self/status is missing the umask is read with os.umask (set and restored)."""
    umask(0o027)
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/self/status":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", no_proc)
    assert atomic._umask() == 0o027 and new_file_mode() == 0o640
    assert os.umask(0o027) == 0o027


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_folders_get_the_umask_mode(tmp_path, umask):
    umask(0o022)
    counts = Counter()

    def fill(tmp):
        counts["calls"] += 1
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f.json").write_text("{}")
    out = atomic_folder(tmp_path / "dataset", fill)
    assert counts["calls"] == 1
    assert mode(out) == 0o755 and mode(out / "sub") == 0o755 and mode(out / "sub" / "f.json") == 0o644
