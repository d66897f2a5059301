"""benchmarks/bench_ipc.py (quoted in benchmarks/README.md) runs and prints its table; its timings
mean nothing at this size, only that both ways of sending the targets arrive whole (the script asserts the
received element count)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_ipc_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ipc.py"), "--instances", "3", "40",
                           "--repeats", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 3 |") or line.startswith("| 40 |")]
    assert len(rows) == 2 and all(row.rstrip().endswith("x |") for row in rows), proc.stdout
