"""Allowed values checked at load (gains/config_rules.py) and `train.py --print-config`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gains.config import load_config
from gains.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("override, says", [
    ("model.mode=gainz", "model.mode='gainz' is not allowed: choose one of mask_rcnn, reweight_only"),
    ("model.backbone.norm=batchnorm", "model.backbone.norm='batchnorm' is not allowed: choose one of frozen_bn"),
    ("model.backbone.depth=52", "model.backbone.depth=52 is not allowed: choose one of 18, 34, 50, 101"),
    ("data.min_size_test=-64", "data.min_size_test=-64 is not allowed: must be >= 1"),
    ("data.min_size_train=[320,0]", "data.min_size_train=[320, 0] is not allowed: each value must be >= 1"),
    ("model.roi_heads.positive_fraction=1.5", "positive_fraction=1.5 is not allowed: must be in [0, 1]"),
    ("solver.base_lr=-0.01", "solver.base_lr=-0.01 is not allowed: must be >= 0"),
    ("solver.gamma=0", "solver.gamma=0 is not allowed: must be > 0"),
    ("solver.momentum=1.0", "solver.momentum=1.0 is not allowed: must be in [0, 1)"),
    ("test.tiling=sometimes", "test.tiling='sometimes' is not allowed"),
    ("test.tile_overlap=512", "test.tile_overlap=512 must be smaller than test.tile_size=512"),
    ("device=gpu", "device='gpu' is not allowed"),
    ("model.rpn.iou_thresholds=[0.7,0.3]", "first <= the second"),
])
def test_a_bad_value_is_one_line_naming_key_value_and_what_is_allowed(override, says):
    with pytest.raises(ConfigError) as e:
        load_config(str(ROOT / "configs/quickstart.yaml"), [override])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_every_shipped_config_and_allowed_edges_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(str(path))
    load_config(None, ["model.roi_heads.positive_fraction=1.0", "data.hflip_prob=0", "device=cuda:1",
                       "test.tile_overlap=0", "test.max_dets_eval=null", "model.roi_heads.mask_loss_weight=null"])


def test_train_cli_stops_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "configs/quickstart.yaml", "model.mode=gainz",
                           f"output_dir={out}", f"data.root={tmp_path / 'data'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "model.mode='gainz' is not allowed" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists() and not (tmp_path / "data").exists()


def test_print_config_shows_the_resolved_checked_config():
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "configs/deepfish.yaml", "solver.base_lr=0.01",
                           "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["solver"]["base_lr"] == 0.01 and cfg["gamm"]["variant"] == "chrom"  # override + file + base
    assert cfg["model"]["backbone"]["depth"] == 18 and "tile_scale" in cfg["test"]
    bad = subprocess.run([sys.executable, str(ROOT / "train.py"), "configs/deepfish.yaml", "solver.gamma=-1",
                          "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "solver.gamma=-1 is not allowed" in bad.stderr
