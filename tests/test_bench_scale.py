"""benchmarks/bench_scale.py --quick runs end to end (each configuration in its own subprocess) and writes
its tables; the numbers of a quick run mean nothing, only that every part runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_scale_quick(tmp_path):
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--quick",
                           "--work", str(work)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for title in ("### Training step memory and time vs instance count", "### GA map disk size",
                  "### Prediction of a whole field"):
        assert title in out
    assert "failed" not in out, out
    assert "gains, target_format=sparse" in out and "torchvision Mask R-CNN" in out
    assert "| nuclei ws 8 f 0.8 ol 0.1 | compact |" in out and "| nuclei ws 8 f 0.8 ol 0.1 | authors |" in out
    assert "refused: image of" in out  # the whole-image path refuses a field it would shrink too much
    assert "### Prediction of a whole field" in (work / "results.md").read_text()
    # the authors' layout (dense H x W per annotation) is deleted after measuring
    assert not list((work / "p2").glob("maps_*_authors"))
