#!/usr/bin/env python
"""Stress the two-process evaluation's exit: `torchrun --nproc_per_node=2 evaluate.py --ckpt ...`, N times.

    python benchmarks/stress_ddp_eval.py [--runs 20] [--no-busy] [--work DIR] [--out stress.json]

Issue 20 item 7: once in CI, rank 1 of that command printed 'terminate called without an active exception'
and died of SIGABRT at exit. This script (1) trains, once, the tiny checkpoint that
tests/test_evaluate_cli.py::test_train_then_evaluate_in_all_three_modes trains (quickstart config, 3
iterations on 4 synthetic 96 x 96 images; kept in --work and reused), (2) runs the test's torchrun command
--runs times while a busy child process spins on one core (--no-busy: without it), as CI's shared runners
do, and (3) records for each run the exit code, whether the output holds 'terminate called', 'SIGABRT' or
'Signal 6' (any 'Fatal Python error' is kept too: PYTHONFAULTHANDLER=1 prints the Python stacks of a
process that aborts), whether the metrics match the first run's, and the wall time. It prints
'N runs, K failures' and writes every run's record to --out (default: WORK/stress_ddp_eval.json).
Not a CI test: 20 runs take ~10 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ABORT_MARKERS = ("terminate called", "SIGABRT", "Signal 6", "signal 6", "Aborted", "Fatal Python error")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def prepare(work: Path) -> Path:
    """The test's tiny checkpoint (trained once, then reused): returns model_final.pth."""
    ckpt = work / "run/model_final.pth"
    if ckpt.is_file():
        return ckpt
    from gains.synthetic import make_synthetic_dataset

    make_synthetic_dataset(work / "data", num_train=4, num_val=2, num_test=2, image_size=(96, 96),
                           overwrite=True)
    overrides = [f"output_dir={work / 'run'}", f"data.root={work / 'data'}", "data.num_workers=0",
                 "data.min_size_train=[96]", "data.min_size_test=96", "solver.max_iter=3", "solver.ims_per_batch=2",
                 "solver.checkpoint_period=3", "solver.log_period=1", "solver.warmup_iters=1",
                 "solver.steps=[2]", "test.eval_at_end=false", "test.score_thresh=0.0"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(ROOT / "configs/quickstart.yaml"),
                           *overrides], capture_output=True, text=True, env=_env(), timeout=1200)
    if proc.returncode != 0 or not ckpt.is_file():
        sys.exit(f"training the stress checkpoint failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return ckpt


def start_busy() -> subprocess.Popen:
    """A child python spinning on one core (CPU contention like a shared CI runner)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def one_run(ckpt: Path, out: Path, timeout: float) -> dict:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "evaluate.py"), "--ckpt", str(ckpt),
           "--out", str(out)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", str(e.stdout or ""), str(e.stderr or "")
    seconds = time.perf_counter() - t0
    text = stdout + stderr
    markers = [m for m in ABORT_MARKERS if m in text]
    metrics = None
    if (out / "metrics.json").is_file():
        m = json.loads((out / "metrics.json").read_text())
        metrics = {k: m.get(k) for k in ("num_images", "num_detections", "mAP", "aji", "box_AP")}
    tables = stdout.count("Cell/Nuclei mean")
    failed = rc != 0 or bool(markers) or tables != 1 or metrics is None
    return {"rc": rc, "markers": markers, "tables": tables, "metrics": metrics, "seconds": round(seconds, 2),
            "failed": failed, "stderr_tail": stderr[-4000:] if (failed or markers) else ""}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--busy", action=argparse.BooleanOptionalAction, default=True,
                   help="spin a child process on one core during the runs (default: on)")
    p.add_argument("--work", default=str(ROOT / "runs/stress_ddp_eval"),
                   help="folder for the data, checkpoint and outputs (checkpoint reused)")
    p.add_argument("--out", help="json report (default: WORK/stress_ddp_eval.json)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run")
    p.add_argument("--label", default="", help="free text stored in the report (e.g. 'before fix')")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = prepare(work)
    busy = start_busy() if args.busy else None
    runs = []
    try:
        for i in range(args.runs):
            out = work / f"eval_{i}"
            if (out / "metrics.json").exists():
                (out / "metrics.json").unlink()
            r = one_run(ckpt, out, args.timeout)
            first = runs[0]["metrics"] if runs else None
            if first is not None and r["metrics"] is not None and r["metrics"] != first:
                r["failed"], r["metrics_differ"] = True, True
            runs.append(r)
            print(f"run {i + 1}/{args.runs}: rc={r['rc']} {r['seconds']:.1f}s"
                  f"{' markers=' + ','.join(r['markers']) if r['markers'] else ''}{' FAILED' if r['failed'] else ''}",
                  flush=True)
            if r["failed"]:
                print(r["stderr_tail"][-2000:], flush=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    failures = sum(r["failed"] for r in runs)
    aborts = sum(bool(r["markers"]) for r in runs)
    import torch

    report = {"label": args.label, "runs": len(runs), "failures": failures, "aborts": aborts, "busy": args.busy,
              "torch": torch.__version__, "cpus": os.cpu_count(),
              "median_seconds": sorted(r["seconds"] for r in runs)[len(runs) // 2] if runs else None,
              "command": "torchrun --standalone --nproc_per_node=2 evaluate.py --ckpt CKPT --out DIR",
              "results": runs}
    out = Path(args.out) if args.out else work / "stress_ddp_eval.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"{len(runs)} runs, {failures} failures ({aborts} with abort markers); wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
