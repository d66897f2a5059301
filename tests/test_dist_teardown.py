"""gains.dist.destroy_distributed really stops the gloo backend's threads, even when torchvision is first
imported after the process group exists (what evaluate.py does: it joins the group, then loads the model
stack). Before the fix the WORLD group stayed referenced by torch.distributed.nn.functional's default
arguments, and its threads (gloo_tcp_loop, pt_gloo_runloop) were still running when the interpreter exited
(issue 20: rank 1 of `torchrun --nproc_per_node=2 evaluate.py` once aborted at exit). The exit itself is
stressed by benchmarks/stress_ddp_eval.py, not here.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import os, sys
from gains import dist
info = dist.init_distributed()
assert info.initialized and info.world_size == 2, info
import torchvision  # noqa: F401  (late, as evaluate.py's run_model: pulls in torch.distributed.nn.functional)
assert dist.all_gather_object(dist.get_rank()) == [0, 1]
dist.destroy_distributed(synchronize=True)  # as the CLIs on success: barrier, then destroy
assert not dist.is_initialized()
names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
print("THREADS", " ".join(names), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc (Linux)")
def test_destroy_distributed_stops_the_gloo_threads_after_a_late_torchvision_import():
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}: {err[-3000:]}"
        line = next(x for x in out.splitlines() if x.startswith("THREADS"))
        left = [n for n in line.split()[1:] if "gloo" in n or "tcpstore" in n]
        assert not left, f"rank {rank}: backend threads still running after destroy_distributed: {line}"
