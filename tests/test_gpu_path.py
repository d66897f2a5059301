"""The GPU path, tested on the CPU: AMP options (bf16 runs on the CPU), channels_last, persistent workers, the
engine's step with the GradScaler (fp16 runs on the CPU too) and its non-finite stop, and bench_gpu.py.

What needs a GPU (fp16 speed, cuDNN, NCCL) is in test_train_step.py's CUDA cases (skipped without CUDA) and in
`python benchmarks/bench_gpu.py`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gains import engine, optim, precision, sampling, train_step
from gains.alrm import anomaly_loss
from gains.checkpoint import find_last_checkpoint, read_checkpoint
from gains.config import ConfigError, load_config
from gains.mask_head import TargetCrops, crop_per_gt, mask_loss
from gains.roi_heads import box_losses
from gains.sparse_maps import SparseMaps
from test_engine import TinyDataset, TinyDetector, metrics_lines, tiny_cfg
from test_model import make_sample, tiny_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.usefixtures("restore_global_state"),
              pytest.mark.filterwarnings("ignore:solver.amp=fp16 on the CPU")]


def run(cfg, resume=False, **model_kwargs):
    torch.manual_seed(0)
    model = TinyDetector(**model_kwargs)
    engine.train(cfg, resume=resume, model=model, dataset=TinyDataset())
    return model


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- AMP option

@pytest.mark.parametrize("value, mode", [(False, "off"), (None, "off"), ("false", "off"), (True, "auto"),
                                         ("true", "auto"), (1, "auto"), (0, "off"), ("bf16", "bf16"),
                                         ("BF16", "bf16"), ("fp16", "fp16"), ("float16", "fp16")])
def test_amp_values(value, mode):
    assert precision.parse_amp(value) == mode


def test_amp_bad_value_is_a_config_error_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"solver.amp must be false, true, bf16 or fp16, got 'int8'"):
        precision.parse_amp("int8")
    with pytest.raises(ConfigError, match="solver.amp"):
        run(tiny_cfg(tmp_path, "solver.amp=int8"))
    assert not (tmp_path / "model_final.pth").exists()


cpu_has_native_bf16 = precision.cpu_has_native_bf16


def test_amp_resolution_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # AVX512-BF16 / AMX
    assert precision.resolve_amp(False, cpu).dtype is None and precision.resolve_amp(True, cpu).dtype == torch.bfloat16
    assert not precision.resolve_amp(True, cpu).use_scaler
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # e.g. AVX2 only: float32 is fastest
    assert precision.resolve_amp(True, cpu).dtype is None
    with pytest.warns(UserWarning, match="no native bfloat16.*solver.amp=true"):
        assert precision.resolve_amp("bf16", cpu).dtype == torch.bfloat16
    with pytest.warns(UserWarning, match="slower than bf16"):
        assert precision.resolve_amp("fp16", cpu).use_scaler
    for native, auto in ((True, torch.bfloat16), (False, torch.float16)):  # Ampere+ vs older GPUs
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        amp = precision.resolve_amp(True, cuda)
        assert amp.dtype == auto and amp.use_scaler == (auto == torch.float16)
        assert precision.resolve_amp("fp16", cuda).use_scaler and precision.resolve_amp(False, cuda).name == "fp32"
    with pytest.warns(UserWarning, match="emulated"):
        assert precision.resolve_amp("bf16", cuda).dtype == torch.bfloat16
    for probes in ((True, False), (False, True), (False, False)):  # AVX512-BF16, AMX, neither
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=probes[0]: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=probes[1]: v)
        monkeypatch.setattr(precision, "cpu_has_native_bf16", cpu_has_native_bf16)
        assert precision.cpu_has_native_bf16() == any(probes)
    for old in ("solver.amp=false", "solver.amp=true"):  # old configs keep loading and validating
        engine.check_solver(load_config(None, [old]).solver)


def test_losses_are_float32_under_autocast():
    """Autocast runs the mask BCE, the GA MSE and the box losses in float32 on bf16 logits: same numbers as
    the float32 functions applied to the upcast logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2, 28, 28, generator=g).bfloat16()
    labels = torch.tensor([1, 2, 1, 2, 2, 1])
    targets = (torch.rand(6, 28, 28, generator=g) > 0.5).float()
    ga = 1 + 0.5 * torch.rand(6, 28, 28, generator=g)
    cls, deltas = torch.randn(6, 3, generator=g).bfloat16(), torch.randn(6, 8, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = mask_loss(logits, labels, targets, ga)
        a = anomaly_loss(logits, labels, ga)
        b = box_losses(cls.float(), deltas.float(), labels, torch.randn(6, 4, generator=g))
    assert m.dtype == a.dtype == b["loss_cls"].dtype == b["loss_box_reg"].dtype == torch.float32
    assert torch.equal(m, mask_loss(logits.float(), labels, targets, ga))
    assert torch.equal(a, anomaly_loss(logits.float(), labels, ga))


def test_cpu_bf16_step_of_the_real_model():
    model = tiny_model("gains").train()  # every loss, GA-weighted BCE and the anomaly branch included
    images, targets = zip(*[make_sample(seed=i, image_id=i) for i in range(2)])
    amp = precision.resolve_amp("bf16", torch.device("cpu"))
    optimizer = optim.build_optimizer(load_config(None), model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    with precision.autocast(amp, torch.device("cpu")):
        losses = model(list(images), list(targets))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    before = [p.detach().clone() for p in params]
    train_step.backward_and_step(sum(losses.values()), optimizer, torch.amp.GradScaler("cpu", enabled=False), params)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs_resume_bitwise_with_the_scaler_state(tmp_path, amp):
    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_cfg(full, f"solver.amp={amp}"))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(part, f"solver.amp={amp}"), crash_at=5)
    run(tiny_cfg(part, f"solver.amp={amp}"), resume=True)
    a, b = read_checkpoint(full / "model_final.pth"), read_checkpoint(part / "model_final.pth")
    assert same_weights(a["model"], b["model"])
    if amp == "fp16":  # GradScaler state saved and restored (scale, growth tracker)
        assert a["scaler"] is not None and a["scaler"] == b["scaler"]
        assert read_checkpoint(part / "model_0000003.pth")["scaler"] is not None
    else:
        assert a["scaler"] is None
    assert [r["total_loss"] for r in metrics_lines(full)] == [r["total_loss"] for r in metrics_lines(part)]


# ----------------------------------------------------------------------------------------------- channels_last

def test_channels_last_forward_matches_the_default():
    images, targets = zip(*[make_sample(seed=i, image_id=i) for i in range(2)])
    out = {}
    for cl in (False, True):
        model = tiny_model("gains", 50).train()
        if cl:
            model.to(memory_format=torch.channels_last)
            assert model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        torch.manual_seed(1)  # same RPN/RoI sampling
        out[cl] = model(list(images), list(targets))
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-4, atol=1e-6, msg=k)


def test_channels_last_training_run(tmp_path):
    base = run(tiny_cfg(tmp_path / "a", "solver.max_iter=2"))
    model = run(tiny_cfg(tmp_path / "b", "solver.max_iter=2", "solver.channels_last=true"))
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for k, v in base.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="solver.channels_last"):
        run(tiny_cfg(tmp_path / "c", "solver.channels_last=1"))


# ----------------------------------------------------------------------------------------------- data loader

def test_loader_workers_are_persistent_and_pinned_only_when_asked():
    kw = dict(images_per_rank=2, seed=0, rank=0, world_size=1, start_iter=0)
    assert sampling.build_train_loader(TinyDataset(), num_workers=2, **kw).persistent_workers
    loader = sampling.build_train_loader(TinyDataset(), num_workers=0, **kw)
    assert not loader.persistent_workers and not loader.pin_memory


def test_persistent_workers_resume_bitwise_with_fused_sgd(tmp_path):
    """Workers (persistent), a resume and the CPU's fused SGD: same weights as one run in the main process."""
    ref = run(tiny_cfg(tmp_path / "main_process"))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(tmp_path / "workers", "data.num_workers=2"), crash_at=5)
    run(tiny_cfg(tmp_path / "workers", "data.num_workers=2"), resume=True)
    b = read_checkpoint(tmp_path / "workers" / "model_final.pth")
    assert same_weights(ref.state_dict(), b["model"])
    assert b["optimizer"]["param_groups"][0]["fused"] is True


# ----------------------------------------------------------------------------------------------- the step

@pytest.mark.parametrize("amp", ["false", "fp16"])
@pytest.mark.parametrize("log_period", [1, 4])
def test_nonfinite_loss_stops_before_the_weights_change(tmp_path, amp, log_period):
    """Checked on the host every step, whatever the log period: the run stops before the bad step's backward."""
    cfg = tiny_cfg(tmp_path, "solver.checkpoint_period=2", f"solver.log_period={log_period}", "solver.max_iter=8",
                   f"solver.amp={amp}")
    torch.manual_seed(0)
    model = TinyDetector(nan_at=5)
    with pytest.raises(FloatingPointError, match=r"iteration 5: loss_a .*loss_a=nan") as info:
        engine.train(cfg, model=model, dataset=TinyDataset())
    assert "model_0000004.pth" in str(info.value)
    assert find_last_checkpoint(tmp_path).name == "model_0000004.pth"  # the checkpoint at 6 was not written
    assert not (tmp_path / "model_0000006.pth").exists() and not (tmp_path / "model_final.pth").exists()
    # the bad update never reached the weights (nor the optimizer: no gradient was computed)
    assert same_weights(read_checkpoint(tmp_path / "model_0000004.pth")["model"], model.state_dict())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    last = metrics_lines(tmp_path)[-1]
    assert last["iter"] == 5 and last["error"] == "non-finite loss" and last["loss_a"] == "nan"
    assert "step. Last good checkpoint" in str(info.value)


def test_rpn_drops_nonfinite_proposals_in_eval_and_stops_in_cpu_training():
    model = tiny_model("mask_rcnn")
    rpn = model.rpn
    sizes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    anchors = rpn.anchor_generator(sizes, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(1, len(a), generator=g) for a in anchors]
    deltas = [0.1 * torch.randn(1, len(a), 4, generator=g) for a in anchors]
    clean = rpn.eval()._select_proposals(anchors, logits, deltas, [(64, 64)])[0]
    top = logits[0].argmax()
    deltas[0][0, top, 0] = float("nan")
    dirty = rpn._select_proposals(anchors, logits, deltas, [(64, 64)])[0]
    assert torch.isfinite(clean).all() and torch.isfinite(dirty).all() and len(dirty) > 0
    with pytest.raises(FloatingPointError, match="non-finite RPN proposals"):
        rpn.train()._select_proposals(anchors, logits, deltas, [(64, 64)])


def test_sparse_target_crops_from_a_host_copy_of_the_rois():
    """SparseMaps on another device than the RoIs are cropped from one host copy of all RoIs: the same crops."""
    class FarMaps(SparseMaps):  # reports another device, so TargetCrops takes its host path
        device = property(lambda self: torch.device("meta"))

    _, t1 = make_sample(seed=0)
    _, t2 = make_sample(seed=1, shapes=((20, 20, 8, 8), (40, 50, 10, 12), (60, 30, 9, 9)))
    g = torch.Generator().manual_seed(0)
    boxes, gts, dense, far = [], [], [], []
    for t in (t1, t2):
        n = len(t["boxes"])
        gt = torch.randint(0, n, (7,), generator=g)
        boxes.append(t["boxes"][gt] + torch.randn(7, 4, generator=g))
        gts.append(gt)
        sm = SparseMaps.from_dense(t["ga"], fill=1.0)
        dense.append(sm)
        far.append(FarMaps(sm.boxes, sm.patches, sm.size, sm.fill))
    want = torch.cat([crop_per_gt(m, b, i, 28) for m, b, i in zip(dense, boxes, gts)])
    crops = TargetCrops(boxes, gts, 28)
    assert torch.equal(crops(far), want) and crops._host is not None
    assert torch.equal(TargetCrops(boxes, gts, 28)(dense), want)


# ----------------------------------------------------------------------------------------------- bench_gpu.py

def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu
    return bench_gpu


def test_bench_gpu_batch_and_table_format(capsys):
    """The benchmark's data, argument defaults and tables without running a model (the runs are slow tests)."""
    bench = _bench()
    images, targets = bench.make_isbi_batch(2, 64, cells=2)
    assert images[0].shape == (3, 64, 64) and targets[0]["masks"].shape[1:] == (64, 64)
    assert set(targets[0]["labels"].tolist()) <= {1, 2} and (targets[0]["ga"] >= 1).all()
    ours = bench.targets_for("gains", targets, torch.device("cpu"), sparse=True)
    assert isinstance(ours[0]["masks"], SparseMaps) and torch.equal(ours[0]["masks"].dense(), targets[0]["masks"])
    rows = [{"model": m, "precision": "bf16", "size": 64, "batch": 2, "times": [t, t], "peak_gib": float("nan"),
             "nonfinite": False, "paste_times": [t, t]} for m, t in (("torchvision", 2.0), ("gains", 1.0))]
    args = type("A", (), dict(cells=2, targets="sparse", iters=2, warmup=1, quick=True, precisions=["bf16"],
                              budget_s=60.0))()
    bench.print_single(args, torch.device("cpu"), {"train": rows, "infer": rows, "skipped": [], "seconds": 1},
                       "python benchmarks/bench_gpu.py --quick")
    out = capsys.readouterr().out
    assert "| 64 | 2 | bf16 | gains, mode gains | 1.000 / 1.000 | 0.50x / 0.50x | 2.0 | - | - |" in out
    assert "gains/torchvision train step, bf16, 64 px, batch 2: 0.50x (target <= 1.0)" in out


@pytest.mark.slow
def test_bench_gpu_quick_runs_on_the_cpu(tmp_path):
    # no time budget: every path must run, however slow this CPU's emulated bf16 is (minutes without AVX512-BF16)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_gpu.py"), "--device", "cpu", "--quick",
                           "--budget-s", "1e9", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "**training step**" in proc.stdout and "**inference**" in proc.stdout
    res = json.loads((tmp_path / "r.json").read_text())
    assert {(r["model"], r["precision"]) for r in res["train"]} == {
        (m, p) for m in ("torchvision", "mask_rcnn", "gains") for p in ("fp32", "bf16")}
    assert not any(r["nonfinite"] for r in res["train"])


@pytest.mark.slow
def test_bench_gpu_ddp_two_gloo_processes():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "benchmarks/bench_gpu.py"),
                           "--ddp", "--device", "cpu", "--quick"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend gloo" in proc.stdout and "| gains, mode gains | bf16 |" in proc.stdout
