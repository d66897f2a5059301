"""Two gloo processes with one image each train to the same weights as one process with a batch of two.

Each worker sets the variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so this
exercises gains.dist.init_distributed exactly as `torchrun --nproc_per_node=2 train.py` does.
"""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from gains import dist, engine
from gains.checkpoint import read_checkpoint
from test_engine import TinyDataset, TinyDetector, tiny_cfg  # noqa: E402  (tests/ is on sys.path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a small CI machine
    try:
        torch.manual_seed(0)
        engine.train(tiny_cfg(out_dir), model=TinyDetector(noisy=False), dataset=TinyDataset())
    finally:
        dist.destroy_distributed()


@pytest.mark.slow
def test_two_process_gloo_matches_one_process_with_same_global_batch(tmp_path):
    torch.manual_seed(0)
    single = tmp_path / "single"
    engine.train(tiny_cfg(single), model=TinyDetector(noisy=False), dataset=TinyDataset())
    torch.use_deterministic_algorithms(False)

    ddp = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, _free_port(), str(ddp)), nprocs=2, join=True)

    a, b = read_checkpoint(single / "model_final.pth"), read_checkpoint(ddp / "model_final.pth")
    assert b["world_size"] == 2 and len(b["rng_states"]) == 2
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    la = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lb] == list(range(1, 7))
    for ra, rb in zip(la, lb):  # logged losses are means over ranks = the single process's batch means
        assert rb["total_loss"] == pytest.approx(ra["total_loss"], rel=1e-5)
        assert rb["lr"] == ra["lr"]
