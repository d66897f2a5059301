"""Training engine: LR schedule, optimizer groups, sampler, checkpoints, exact resume, non-finite stop, eval hook.

Runs use a stand-in detector (`TinyDetector`, a few hundred parameters returning a loss dict like the real
model) and a stand-in data set (`TinyDataset`, random images with Python-`random` and torch augmentation),
so every test takes well under a second on CPU. test_engine_ddp.py and test_train_cli.py import them.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from gains import checkpoint as ckpt_mod
from gains import engine, optim, sampling
from gains.checkpoint import (CheckpointError, find_last_checkpoint, load_checkpoint, load_weights_for_finetune,
                              read_checkpoint, save_checkpoint)
from gains.config import ConfigError, load_config


# ----------------------------------------------------------------------------------------------- stand-ins

class TinyDetector(nn.Module):
    """Returns {'loss_a', 'loss_b'} averaged over the batch, like the real model's loss dict.

    noisy: multiply losses by torch.rand noise (the global generator, like RPN/RoI sampling) and use
    dropout, so exact resume must restore the process's random state. nan_at / crash_at: the forward call
    number (1-based) that returns a NaN loss / raises, to simulate divergence and a killed run.
    """

    def __init__(self, noisy: bool = True, nan_at: int | None = None, crash_at: int | None = None, out: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, out)
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)
        self.noisy, self.nan_at, self.crash_at, self.calls = noisy, nan_at, crash_at, 0

    def forward(self, images, targets=None):
        if not self.training:
            return [{"boxes": torch.zeros(0, 4)} for _ in images]
        self.calls += 1
        if self.crash_at == self.calls:
            raise KeyboardInterrupt("simulated kill")
        loss_a, loss_b = [], []
        for image, target in zip(images, targets):
            feat = torch.relu(self.norm(self.conv(image[None]))).mean(dim=(2, 3))
            if self.noisy:
                feat = nn.functional.dropout(feat, 0.2, training=True)
            out = self.head(feat)[0]
            noise = 1 + 0.1 * torch.rand(()) if self.noisy else 1.0
            loss_a.append((out[0] - target["value"]) ** 2 * noise)
            loss_b.append(out[1].abs() * self.frozen)
        losses = {"loss_a": torch.stack(loss_a).mean(), "loss_b": torch.stack(loss_b).mean()}
        if self.nan_at == self.calls:
            losses["loss_a"] = losses["loss_a"] * float("nan")
        return losses


class FakeCategoryMap:
    def to_dict(self):
        return {"json_ids": [7], "names": ["cell"]}


class TinyDataset(Dataset):
    """Random 3x12x16 images (fixed per index) with a random flip (Python `random`, as the real transforms)
    and a random brightness (torch global generator); target 'value' = index / n."""

    category_map = FakeCategoryMap()

    def __init__(self, n: int = 5):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = torch.rand(3, 12, 16, generator=torch.Generator().manual_seed(i))
        if random.random() < 0.5:
            image = image.flip(-1)
        image = image * (0.5 + torch.rand(()))
        return image, {"value": torch.tensor(i / self.n), "image_id": i, "orig_size": (12, 16)}


def tiny_cfg(out_dir, *overrides):
    """base.yaml with a 6-iteration CPU schedule (warm-up 2, decay at 4), checkpoints every 3 iterations."""
    return load_config(None, [f"output_dir={out_dir}", "device=cpu", "deterministic=true", "seed=3",
                              "data.num_workers=0", "solver.max_iter=6", "solver.warmup_iters=2",
                              "solver.steps=[4]", "solver.base_lr=0.1", "solver.checkpoint_period=3",
                              "solver.log_period=1", "solver.ims_per_batch=2", "test.eval_at_end=false",
                              *overrides])


def run(cfg, resume=False, **model_kwargs):
    torch.manual_seed(0)  # same initial weights for every run of a test
    return engine.train(cfg, resume=resume, model=TinyDetector(**model_kwargs), dataset=TinyDataset())


pytestmark = pytest.mark.usefixtures("restore_global_state")  # conftest: train() changes global state


def metrics_lines(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- schedule

def test_lr_factor_warmup_and_steps():
    kw = dict(warmup_iters=1000, warmup_factor=0.001, steps=[15000, 18000], gamma=0.1)
    assert optim.lr_factor(0, **kw) == pytest.approx(0.001)
    assert optim.lr_factor(500, **kw) == pytest.approx(0.001 * 0.5 + 0.5)
    assert optim.lr_factor(999, **kw) == pytest.approx(0.001 * 0.001 + 0.999)
    assert optim.lr_factor(1000, **kw) == 1.0
    assert optim.lr_factor(14999, **kw) == 1.0
    assert optim.lr_factor(15000, **kw) == pytest.approx(0.1)
    assert optim.lr_factor(17999, **kw) == pytest.approx(0.1)
    assert optim.lr_factor(18000, **kw) == pytest.approx(0.01)
    assert optim.lr_factor(0, warmup_iters=0, warmup_factor=0.001, steps=[], gamma=0.1) == 1.0


def test_scheduler_lr_per_iteration_and_resume_uses_config_shape():
    cfg = load_config("configs/isbi_r50.yaml")
    model = nn.Linear(2, 2)
    opt = optim.build_optimizer(cfg, model)
    sched = optim.build_lr_scheduler(cfg, opt)
    seen = {}
    for it in range(18001):
        if it in (0, 1, 999, 1000, 14999, 15000, 18000):
            seen[it] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.015 * 0.001)
    assert seen[1] == pytest.approx(0.015 * (0.001 * 0.999 + 0.001))
    assert seen[999] == pytest.approx(0.015 * (0.001 * 0.001 + 0.999))
    assert seen[1000] == seen[14999] == pytest.approx(0.015)
    assert seen[15000] == pytest.approx(0.0015)
    assert seen[18000] == pytest.approx(0.00015)

    # resume at iteration 16000 with a config that moved the steps: position from the state, shape from cfg
    state, opt_state = sched.state_dict(), opt.state_dict()
    assert set(state) == {"last_epoch", "_step_count"}
    cfg2 = load_config("configs/isbi_r50.yaml", ["solver.steps=[60000,80000]"])
    opt2 = optim.build_optimizer(cfg2, nn.Linear(2, 2))
    sched2 = optim.build_lr_scheduler(cfg2, opt2)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 18001
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.015)


def test_optimizer_groups_norm_decay_and_frozen_params():
    cfg = load_config(None, ["solver.weight_decay=0.01", "solver.weight_decay_norm=0.0"])
    model = TinyDetector()
    opt = optim.build_optimizer(cfg, model)
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert by_id[id(model.norm.weight)] == by_id[id(model.norm.bias)] == 0.0
    assert by_id[id(model.conv.weight)] == by_id[id(model.head.bias)] == 0.01
    assert id(model.frozen) not in by_id
    assert opt.param_groups[0]["momentum"] == 0.9


def test_batch_size_must_divide_over_processes():
    assert engine.check_batch_size(4, 2) == 2
    with pytest.raises(ConfigError, match=r"solver.ims_per_batch=3 .*\(2\)"):
        engine.check_batch_size(3, 2)


def test_bad_solver_values_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="solver.checkpoint_period"):
        run(tiny_cfg(tmp_path, "solver.checkpoint_period=0"))


# ----------------------------------------------------------------------------------------------- sampler

def test_sampler_ranks_interleave_one_global_stream_and_resume_offsets():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = take(sampling.TrainingSampler(5, seed=1), 12)
    assert sorted(i for i, _ in single[:5]) == list(range(5))  # epoch 0 is a permutation
    assert [p for _, p in single] == list(range(12))
    assert [i for i, _ in single[:5]] != [i for i, _ in single[5:10]]  # epochs are reshuffled
    r0 = take(sampling.TrainingSampler(5, seed=1, rank=0, world_size=2), 6)
    r1 = take(sampling.TrainingSampler(5, seed=1, rank=1, world_size=2), 6)
    assert r0 == single[0::2] and r1 == single[1::2]
    assert take(sampling.TrainingSampler(5, seed=1, start=7), 5) == single[7:12]


def test_augmentation_is_a_function_of_the_stream_position_and_leaves_global_rng_alone():
    data = sampling.SeededSamples(TinyDataset(), seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = data[(2, 9)][0]
    assert torch.equal(torch.get_rng_state(), before)
    random.random()
    torch.rand(5)
    assert torch.equal(data[(2, 9)][0], a)
    assert not torch.equal(data[(2, 10)][0], a)


# ----------------------------------------------------------------------------------------------- checkpoints

def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "model_final.pth"
    save_checkpoint({"x": torch.arange(3)}, path)

    def broken_save(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"x": torch.arange(5)}, path)
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["x"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model_final.pth"]  # no temporary file left behind


def test_checkpoint_content_and_output_files(tmp_path):
    cfg = tiny_cfg(tmp_path, "solver.max_iter=4", "solver.checkpoint_period=2")
    result = run(cfg)
    assert result.final_checkpoint == tmp_path / "model_final.pth" and result.iterations == 4
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000002.pth", "model_final.pth"]
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_final.pth"
    ck = read_checkpoint(tmp_path / "model_final.pth")  # weights_only=True: only tensors and plain types
    assert ck["format"] == "gains-checkpoint-v1" and ck["iteration"] == 4
    assert set(ck["model"]) == set(TinyDetector().state_dict())
    assert ck["optimizer"]["state"] and ck["scheduler"]["last_epoch"] == 4 and ck["scaler"] is None
    assert all(g["fused"] is True for g in ck["optimizer"]["param_groups"])  # CPU runs use fused SGD (faster)
    assert ck["config"] == cfg.to_dict() and ck["category_map"] == FakeCategoryMap().to_dict()
    assert len(ck["rng_states"]) == 1 and ck["world_size"] == 1
    assert read_checkpoint(tmp_path / "model_0000002.pth")["iteration"] == 2
    assert load_config(tmp_path / "config.yaml").to_dict() == cfg.to_dict()
    lines = metrics_lines(tmp_path)
    assert [r["iter"] for r in lines] == [1, 2, 3, 4]
    for key in ("loss_a", "loss_b", "total_loss", "lr", "time", "data_time", "eta_seconds"):
        assert key in lines[0]
    assert lines[0]["lr"] == pytest.approx(0.1 * 0.001) and lines[2]["lr"] == pytest.approx(0.1)
    assert (tmp_path / "log.txt").is_file()


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_cfg(full))
    with pytest.raises(KeyboardInterrupt):  # killed during iteration 5, after the checkpoint at 3
        run(tiny_cfg(part), crash_at=5)
    assert find_last_checkpoint(part).name == "model_0000003.pth"
    assert [r["iter"] for r in metrics_lines(part)] == [1, 2, 3, 4]
    result = run(tiny_cfg(part), resume=True)
    assert result.iterations == 6

    a, b = read_checkpoint(full / "model_final.pth"), read_checkpoint(part / "model_final.pth")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert torch.equal(a["rng_states"][0]["torch"], b["rng_states"][0]["torch"])
    # the log of the resumed run reads as one run: iteration 4 of the killed run was dropped and redone
    la, lb = metrics_lines(full), metrics_lines(part)
    assert [r["iter"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert [r["total_loss"] for r in la] == [r["total_loss"] for r in lb]


def test_resume_without_checkpoint_starts_fresh_and_finished_run_is_a_noop(tmp_path):
    assert run(tiny_cfg(tmp_path, "solver.max_iter=2"), resume=True).iterations == 2
    before = (tmp_path / "model_final.pth").read_bytes()
    assert run(tiny_cfg(tmp_path, "solver.max_iter=2"), resume=True).iterations == 2
    assert (tmp_path / "model_final.pth").read_bytes() == before


def test_resume_with_loader_workers_matches_a_run_without_workers(tmp_path):
    """Augmentation is seeded per sample, so neither worker processes nor a resume change the run."""
    run(tiny_cfg(tmp_path / "main_process"))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(tmp_path / "workers", "data.num_workers=2"), crash_at=5)
    run(tiny_cfg(tmp_path / "workers", "data.num_workers=2"), resume=True)
    a = read_checkpoint(tmp_path / "main_process" / "model_final.pth")["model"]
    b = read_checkpoint(tmp_path / "workers" / "model_final.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_clipping_bounds_the_first_update(tmp_path):
    clip, lr = 1e-4, 0.1
    cfg = tiny_cfg(tmp_path, "solver.max_iter=1", "solver.warmup_iters=0", f"solver.clip_grad_norm={clip}",
                   "solver.weight_decay=0", "solver.weight_decay_norm=0", f"solver.base_lr={lr}")
    torch.manual_seed(0)
    before = TinyDetector().state_dict()
    run(cfg)
    after = read_checkpoint(tmp_path / "model_final.pth")["model"]
    step = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before))
    assert 0 < step <= lr * clip * 1.001  # first SGD step = lr x clipped gradient (norm exactly `clip`)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, "solver.checkpoint_period=2")
    with pytest.raises(FloatingPointError, match=r"iteration 5: loss_a .*loss_a=nan") as info:
        run(cfg, nan_at=5)
    assert "model_0000004.pth" in str(info.value)
    assert find_last_checkpoint(tmp_path).name == "model_0000004.pth"
    assert not (tmp_path / "model_final.pth").exists()
    assert read_checkpoint(tmp_path / "model_0000004.pth")["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in read_checkpoint(tmp_path / "model_0000004.pth")["model"].values())
    last = metrics_lines(tmp_path)[-1]
    assert last["iter"] == 5 and last["error"] == "non-finite loss" and last["loss_a"] == "nan"


def test_load_checkpoint_mismatch_names_keys_and_config_values(tmp_path):
    cfg = tiny_cfg(tmp_path, "solver.max_iter=1")
    run(cfg)
    other = load_config(None, ["model.num_classes=5"])
    with pytest.raises(CheckpointError, match=r"head\.weight \(2, 4\) vs model \(3, 4\)") as info:
        load_checkpoint(tmp_path / "model_final.pth", TinyDetector(out=3), config=other)
    assert "model.num_classes: checkpoint 2, config 5" in str(info.value)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth", TinyDetector())
    (tmp_path / "broken.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "broken.pth", TinyDetector())


def test_load_weights_for_finetune_reports_skipped_keys(tmp_path, caplog):
    torch.manual_seed(1)
    src = TinyDetector()
    save_checkpoint({"model": src.state_dict()}, tmp_path / "src.pth")
    dst = TinyDetector(out=3)
    with caplog.at_level("WARNING", logger="gains"):
        report = load_weights_for_finetune(dst, tmp_path / "src.pth")
    assert [k for k, _, _ in report.shape_mismatched] == ["head.weight", "head.bias"]
    assert "head.weight" in caplog.text and "conv.weight" in report.loaded
    assert torch.equal(dst.conv.weight, src.conv.weight)
    torch.save({"unrelated": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no tensor"):
        load_weights_for_finetune(dst, tmp_path / "other.pth")


def test_init_weights_key_fine_tunes_a_fresh_run(tmp_path):
    run(tiny_cfg(tmp_path / "a", "solver.max_iter=2"))
    cfg = tiny_cfg(tmp_path / "b", "solver.max_iter=1", "solver.base_lr=0.0",
                   f"init_weights={tmp_path / 'a' / 'model_final.pth'}")
    run(cfg)
    a = read_checkpoint(tmp_path / "a" / "model_final.pth")["model"]
    b = read_checkpoint(tmp_path / "b" / "model_final.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- evaluation hook

def test_eval_hook_calls_evaluate_model_without_disturbing_training(tmp_path, monkeypatch):
    calls = []

    def evaluate_model(model, cfg, split, output_dir):
        calls.append((split, Path(output_dir).name, model.training))
        torch.rand(3)  # evaluation may consume random numbers; training must not notice
        random.random()
        return {"segm": {"AP": 0.5}}

    run(tiny_cfg(tmp_path / "plain", "solver.max_iter=4"))
    monkeypatch.setattr(engine, "evaluate_model", evaluate_model)
    result = run(tiny_cfg(tmp_path / "eval", "solver.max_iter=4", "solver.eval_period=2",
                          "test.eval_at_end=true"))
    assert calls == [("val", "eval_0000002", False), ("val", "eval_0000004", False),
                     ("test", "eval_final_test", False)]
    assert result.eval_results == {"segm": {"AP": 0.5}}
    evals = [r for r in metrics_lines(tmp_path / "eval") if "eval" in r]
    assert [(r["iter"], r["split"]) for r in evals] == [(2, "val"), (4, "val"), (4, "test")]
    a = read_checkpoint(tmp_path / "plain" / "model_final.pth")["model"]
    b = read_checkpoint(tmp_path / "eval" / "model_final.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- paper configs

@pytest.mark.parametrize("name, variant, ws, ga, ol, target, classes, lr, batch", [
    ("isbi", "isbi", 5, 0.5, 0.1, 0, 2, 0.015, 1),
    ("ucoc", "chrom", 5, 0.5, 0.3, 1, 1, 0.02, 2),
    ("kaggle", "nuclei", 8, 0.8, 0.1, 1, 1, 0.015, 1),
])
@pytest.mark.parametrize("depth", [50, 101])
def test_paper_configs_carry_the_authors_values(name, variant, ws, ga, ol, target, classes, lr, batch, depth):
    cfg = load_config(f"configs/{name}_r{depth}.yaml")
    g = cfg.gamm
    assert (g.variant, g.window_size, g.ga_factor, g.overlap_hl, g.target_category_id) == (variant, ws, ga, ol,
                                                                                           target)
    assert cfg.model.num_classes == classes and cfg.model.backbone.depth == depth
    assert cfg.model.mode == "gains" and cfg.model.backbone.norm == "frozen_bn"
    assert cfg.model.backbone.weights is None and cfg.model.backbone.freeze_at == 2
    s = cfg.solver
    assert (s.base_lr, s.ims_per_batch, s.max_iter, s.warmup_iters) == (lr, batch, 20000, 1000)
    assert (s.momentum, s.weight_decay, s.warmup_factor, s.steps) == (0.9, 0.0001, 0.001, [15000, 18000])
    assert cfg.data.min_size_train == list(range(640, 801, 32))
    assert (cfg.data.max_size_train, cfg.data.min_size_test) == (1333, 800)
    assert cfg.data.root == {"isbi": "data/isbi2014", "ucoc": "data/ucoc", "kaggle": "data/kaggle2018"}[name]
    assert (cfg.data.train_json, cfg.data.train_images, cfg.data.test_json) == ("train.json", "train", "test.json")
    assert cfg.output_dir == f"runs/{name}_r{depth}"
