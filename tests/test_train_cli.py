"""train.py: argument wiring, clear errors, and (slow) end-to-end runs of the real model on synthetic data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script
from gains import engine
from gains.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent
train_cli = load_script("train")


pytestmark = pytest.mark.usefixtures("restore_global_state")  # conftest: train() changes global state


def test_unknown_key_is_a_clear_error_naming_the_key(capsys, monkeypatch):
    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("must not train"))
    assert train_cli.main([str(ROOT / "configs/isbi_r50.yaml"), "solver.base_lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'solver.base_lrr'" in err and "solver.base_lr" in err


def test_unknown_key_from_the_command_line_process(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(ROOT / "configs/kaggle_r50.yaml"),
                           "modle.num_classes=3"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'modle'" in proc.stderr and "Traceback" not in proc.stderr


def test_config_overrides_and_resume_reach_the_engine(monkeypatch):
    seen = {}
    monkeypatch.setattr(engine, "train", lambda cfg, resume: seen.update(cfg=cfg, resume=resume))
    assert train_cli.main([str(ROOT / "configs/ucoc_r50.yaml"), "solver.max_iter=5", "--resume",
                           "output_dir=runs/x"]) == 0
    assert seen["resume"] is True
    assert (seen["cfg"].solver.max_iter, seen["cfg"].solver.base_lr, seen["cfg"].output_dir) == (5, 0.02, "runs/x")


def test_no_config_means_the_quickstart(monkeypatch):
    seen = {}
    monkeypatch.setattr(engine, "train", lambda cfg, resume: seen.update(cfg=cfg))
    assert train_cli.main([]) == 0
    assert seen["cfg"].data.synthetic is True and seen["cfg"].model.backbone.depth == 18
    assert train_cli.main(["solver.max_iter=3"]) == 0  # overrides alone still mean the quickstart
    assert seen["cfg"].solver.max_iter == 3 and seen["cfg"].output_dir == "runs/quickstart"


def test_training_errors_print_a_message_and_exit_nonzero(monkeypatch, capsys):
    def diverge(cfg, resume):
        raise FloatingPointError("non-finite loss at iteration 7: loss_mask")
    monkeypatch.setattr(engine, "train", diverge)
    assert train_cli.main([str(ROOT / "configs/isbi_r50.yaml")]) == 1
    assert "non-finite loss at iteration 7: loss_mask" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- real model

def _real_overrides(tmp_path: Path, out: str, max_iter: int) -> list[str]:
    """A tiny R18-FPN GAInS (branch + GA maps) on 96 px synthetic images: ~0.5 s per iteration on CPU."""
    return [f"output_dir={tmp_path / out}", f"data.root={tmp_path / 'data'}", "data.synthetic=true",
            "device=cpu", "deterministic=true", "data.num_workers=0", "data.min_size_train=[96,128]",
            "data.max_size_train=160", "data.min_size_test=128", "model.num_classes=2",
            "gamm.target_category_id=1", "model.backbone.depth=18", "model.backbone.norm=gn",
            "model.backbone.freeze_at=0", "model.backbone.fpn_channels=32", "model.roi_heads.fc_dim=64",
            "model.roi_heads.mask_conv_dim=32", "model.rpn.batch_size_per_image=64",
            "model.roi_heads.batch_size_per_image=64", f"solver.max_iter={max_iter}",
            "solver.checkpoint_period=2", "solver.log_period=1", "solver.ims_per_batch=2",
            "solver.base_lr=0.01", "solver.warmup_iters=2", "test.eval_at_end=false"]


@pytest.fixture
def synthetic_data(tmp_path):
    from gains.synthetic import make_synthetic_dataset
    make_synthetic_dataset(tmp_path / "data", num_train=4, num_val=2, num_test=2, image_size=(96, 96))
    return tmp_path


@pytest.mark.slow
def test_real_model_resume_is_bitwise_identical(synthetic_data):
    tmp = synthetic_data
    config = str(ROOT / "configs/base.yaml")
    assert train_cli.main([config, *_real_overrides(tmp, "full", 4)]) == 0
    # an interrupted run: 2 iterations (checkpoint), then resumed to 4 with the same command + --resume
    assert train_cli.main([config, *_real_overrides(tmp, "part", 2)]) == 0
    assert train_cli.main([config, *_real_overrides(tmp, "part", 4), "--resume"]) == 0
    a, b = read_checkpoint(tmp / "full/model_final.pth"), read_checkpoint(tmp / "part/model_final.pth")
    assert a["iteration"] == b["iteration"] == 4
    assert {"loss_rpn_cls", "loss_mask", "loss_ga"} <= set(json.loads(
        (tmp / "full/metrics.jsonl").read_text().splitlines()[0]))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["category_map"] == b["category_map"] is not None


@pytest.mark.slow
def test_real_model_under_torchrun_two_processes(synthetic_data):
    tmp = synthetic_data
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           str(ROOT / "configs/base.yaml"), *_real_overrides(tmp, "ddp", 2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = read_checkpoint(tmp / "ddp/model_final.pth")
    assert ck["world_size"] == 2 and ck["iteration"] == 2
    # a global batch that does not split over the processes is refused up front
    bad = [*cmd[:-len(_real_overrides(tmp, "ddp", 2))], *_real_overrides(tmp, "bad", 2), "solver.ims_per_batch=3"]
    proc = subprocess.run(bad, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0 and "solver.ims_per_batch=3 must be a positive multiple" in proc.stderr
