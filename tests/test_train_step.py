"""gains.train_step: the plain training step (GradScaler recipe) and the host check of the losses.

backward_and_step must be the hand-written step, bit for bit: `loss.backward(); [clip_grad_norm_];
optimizer.step()` with the engine's optimizer (fused SGD on the CPU); the GradScaler (fp16) changes nothing
when the gradients do not overflow (its scale is a power of two) and skips the whole update when they do.
check_losses stops the run on a NaN/inf loss before any backward; in the engine, see
test_engine.py::test_nonfinite_loss_stops_and_keeps_last_good_checkpoint and
test_gpu_path.py::test_nonfinite_loss_stops_before_the_weights_change (the live weights stay the checkpoint's).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gains import optim, train_step
from gains.config import load_config
from gains.train_log import MetricsLog

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA GPU"))]


def tiny(device: str, seed: int = 0) -> tuple[nn.Module, torch.optim.SGD, list[nn.Parameter]]:
    """A small model with a norm layer (two parameter groups, as the engine builds them) and its optimizer."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.GroupNorm(2, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    cfg = load_config(None, ["solver.base_lr=0.1", "solver.weight_decay=0.001"])
    fused = optim.use_fused_sgd(torch.device(device))
    opt = optim.build_optimizer(cfg, model, fused=fused)
    optim.prepare_fused_sgd(opt, fused=fused)
    return model, opt, [p for g in opt.param_groups for p in g["params"]]


def loss_of(model: nn.Module, step: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(5, 6, generator=g).to(device), torch.randn(5, 3, generator=g).to(device)
    return (model(x) - y).square().mean() + model(x).abs().mean()


def state(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.parameters()] + [
        opt.state[p]["momentum_buffer"].clone() for p in model.parameters() if "momentum_buffer" in opt.state[p]]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bitwise on the CPU; on CUDA up to the float rounding of kernels that need not be deterministic."""
    if len(a) != len(b):
        return False
    if a and a[0].is_cuda:
        return all(torch.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(a, b))
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scaled", [False, True], ids=["no_scaler", "fp16_scaler"])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_step_is_the_hand_written_step_bit_for_bit(device, scaled, clip):
    model, opt, params = tiny(device)
    ref, ref_opt, ref_params = tiny(device)
    assert optim.use_fused_sgd(torch.device(device)) == (device == "cpu")
    assert all(g["fused"] == (True if device == "cpu" else None) for g in opt.param_groups)
    scaler = torch.amp.GradScaler(device, enabled=scaled)  # its scale 2**16: exact scaling and unscaling
    start = state(model, opt)
    for step in range(3):  # momentum buffers in play from the second step on
        train_step.backward_and_step(loss_of(model, step, device), opt, scaler, params, clip)
        ref_opt.zero_grad(set_to_none=True)
        loss_of(ref, step, device).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(ref_params, clip)
        ref_opt.step()
        assert same(state(model, opt), state(ref, ref_opt)), step
    assert not same(state(model, opt)[:len(params)], start[:len(params)])
    if scaled:
        assert scaler.get_scale() == 2.0**16  # no overflow, no growth yet (growth_interval 2000)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_overflowing_fp16_step_is_skipped_by_the_scaler(device, clip):
    """An overflow of the scaled gradients (the loss finite): no update at all, a clean momentum buffer (fused
    SGD's first step, see optim.prepare_fused_sgd), the scale halved; the next step is an ordinary first step."""
    model, opt, params = tiny(device)
    ref, ref_opt, ref_params = tiny(device)
    start = state(model, opt)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**127)  # the scaled gradients overflow float32
    loss = loss_of(model, 0, device)
    assert torch.isfinite(loss)
    train_step.backward_and_step(loss, opt, scaler, params, clip)
    assert not all(torch.isfinite(p.grad).all() for p in params)
    assert same(state(model, opt)[:len(params)], start[:len(params)])
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p))
               for p in params if "momentum_buffer" in opt.state[p])
    assert scaler.get_scale() == 2.0**126
    scaler.update(1.0)
    train_step.backward_and_step(loss_of(model, 1, device), opt, scaler, params, clip)
    train_step.backward_and_step(loss_of(ref, 1, device), ref_opt, torch.amp.GradScaler(device, enabled=False),
                                 ref_params, clip)
    assert same(state(model, opt), state(ref, ref_opt))  # a skipped step is no step at all


def test_nonfinite_loss_stops_before_the_step(tmp_path):
    model, opt, params = tiny("cpu")
    start = state(model, opt)
    metrics = MetricsLog(tmp_path / "metrics.jsonl", 0, enabled=True)
    names = ("loss_a", "loss_b")
    train_step.check_losses(3, names, torch.tensor([0.5, 2.0]), metrics, tmp_path)  # finite: nothing happens
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    for bad in (float("nan"), float("inf"), -float("inf")):
        total = loss_of(model, 0, "cpu") * bad
        values = torch.stack([total.detach(), torch.tensor(2.0)])
        with pytest.raises(FloatingPointError) as info:
            train_step.check_losses(4, names, values, metrics, tmp_path)
            train_step.backward_and_step(total, opt, torch.amp.GradScaler("cpu", enabled=False), params)
        assert str(info.value).startswith(f"non-finite loss at iteration 4: loss_a (loss_a={bad:.4g}, loss_b=2); "
                                          "training stopped without saving this step. Last good checkpoint: none yet")
        assert all(p.grad is None for p in params) and same(state(model, opt), start)
        record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
        assert record == {"iter": 4, "error": "non-finite loss", "loss_a": str(bad), "loss_b": 2.0}
