"""benchmarks/profile_step.py (quoted in benchmarks/README.md) runs on a tiny config, from fresh weights
and from a checkpoint's (--weights), and prints its phase table, the per-part forward times, the mask-head
RoI count and, with --ops, torch.profiler's operator table; the figures of such a run mean nothing, only that
every part runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gains.checkpoint import make_checkpoint, save_checkpoint
from gains.config import load_config
from gains.model import build_model

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["solver.ims_per_batch=1", "model.roi_heads.batch_size_per_image=16", "model.rpn.post_nms_topk_train=50"]


def test_profile_step_runs_fresh_and_from_weights(tmp_path):
    overrides = [f"data.root={tmp_path / 'synthetic'}", *SMALL]
    ckpt = tmp_path / "w.pth"
    save_checkpoint(make_checkpoint(build_model(load_config("configs/quickstart.yaml", overrides)), iteration=0), ckpt)
    for extra in (["--ops", "5"], ["--weights", str(ckpt)]):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "configs/quickstart.yaml",
                               "--iters", "1", "--warmup", "0", *extra, *overrides],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = proc.stdout
        assert "| step |" in out and "| forward: roi_heads.alrm |" in out and "mask-head RoIs per step:" in out
        assert ("costliest operators (torch.profiler" in out) == ("--ops" in extra)
        if "--weights" in extra:
            n = len(build_model(load_config("configs/quickstart.yaml", overrides)).state_dict())
            assert f"weights: {n} of {n} tensors from {ckpt}" in out
