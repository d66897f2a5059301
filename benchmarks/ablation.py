"""Run the ablation modes x seeds of one config and write the paper-style ablation table.

    python benchmarks/ablation.py configs/isbi2014_train45.yaml --modes mask_rcnn reweight_only branch_only gains \
        --seeds 0 1 2 [--out runs/ablation/isbi2014_train45] [--jobs 2] [key=value ...]
    python benchmarks/ablation.py configs/isbi2014_train45.yaml --table-only [--out ...]

Each (mode, seed) trains in its own folder `OUT/{mode}_s{seed}` with `python train.py CONFIG model.mode=M
seed=S output_dir=... key=value... --resume`, then is evaluated on the val split (`evaluate.py --split val`);
training ends with the test evaluation (`eval_final_test/`). A run whose test and val metrics exist is
skipped, an interrupted one resumes from its last checkpoint: stop and restart the command at will.
`--jobs` runs side by side, each with `cpu_count // jobs` threads (default 2 x 1 thread on a 2-core CPU: one
thread is nearly as fast per step as two in one process, so two runs side by side finish about twice as many
runs per hour; benchmarks/README.md). Each run's output goes to its folder's `train.log`.

The table (`OUT/ablation.md`, `OUT/ablation.json`) is rebuilt from the finished runs every time (and alone
with --table-only): see benchmarks/ablation_table.py for what it holds and how intervals are computed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gains.model import MODES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config shared by every run, e.g. configs/isbi2014_train45.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    p.add_argument("--modes", nargs="+", default=["mask_rcnn", "gains"], choices=list(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", help="folder of the runs and the table (default runs/ablation/<config name>)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs side by side")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    args = p.parse_intermixed_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must be key=value, got {bad}")
    return args


def run_dir(out: Path, mode: str, seed: int) -> Path:
    return out / f"{mode}_s{seed}"


def is_finished(folder: Path) -> bool:
    """A run is finished when its test and val metrics are written."""
    return all((folder / f"eval_final_{s}" / "metrics.json").is_file() for s in ("test", "val"))


def run_commands(config: str, mode: str, seed: int, folder: Path, overrides: list[str]) -> list[list[str]]:
    """The commands of one run: train (resumable; ends with the test evaluation), then the val evaluation."""
    py = sys.executable
    commands = []
    if not (folder / "eval_final_test" / "metrics.json").is_file():
        commands.append([py, str(ROOT / "train.py"), config, f"model.mode={mode}", f"seed={seed}",
                         f"output_dir={folder}", *overrides, "--resume"])
    commands.append([py, str(ROOT / "evaluate.py"), "--ckpt", str(folder / "model_final.pth"), "--split", "val",
                     "--out", str(folder / "eval_final_val")])
    return commands


def execute(commands: list[list[str]], folder: Path, threads: int) -> tuple[int, float]:
    """Run the commands in order with `threads` threads, appending their output to folder/train.log.
    Returns (exit status of the first failing command or 0, seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(folder / "train.log", "a") as log:
        for cmd in commands:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
            if rc != 0:
                return rc, time.perf_counter() - start
    return 0, time.perf_counter() - start


def table(out: Path, config: str):
    """`ablation_table.write_table`, imported when used so that runs start without the analysis stack."""
    from ablation_table import write_table
    return write_table(out, config)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out or ROOT / "runs" / "ablation" / Path(args.config).stem).resolve()
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.table_only:
        # seed-major: the first finished seeds already pair every mode with its baseline
        todo = [(m, s) for s in args.seeds for m in args.modes if not is_finished(run_dir(out, m, s))]
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        print(f"ablation: {len(todo)} run(s) to do in {out}, {args.jobs} side by side x {threads} thread(s)",
              flush=True)

        def one(item):
            mode, seed = item
            folder = run_dir(out, mode, seed)
            rc, seconds = execute(run_commands(args.config, mode, seed, folder, args.overrides), folder, threads)
            print(f"ablation: {mode} seed {seed}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in "
                  f"{seconds / 60:.1f} min; log {folder / 'train.log'}", flush=True)
            if rc == 0:  # a partial table after every finished run; a table error never stops the runs
                try:
                    table(out, args.config)
                except Exception as e:  # noqa: BLE001
                    print(f"ablation: table not written: {e!r}", flush=True)
            return item, rc

        with ThreadPoolExecutor(args.jobs) as pool:
            failed = [item for item, rc in pool.map(one, todo) if rc != 0]
    md = table(out, args.config)
    print(md.read_text() if md else f"ablation: no finished run in {out}")
    if failed:
        print(f"ablation: failed runs {failed}: see their train.log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
