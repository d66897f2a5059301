"""The authors' detectron2 checkpoints as whole files (gains/convert_checkpoint.py): converted, saved, loaded,
evaluated, and the `preprocess.py --from-detectron2 / --inspect-weights` commands. The detectron2 state dicts
come from the inverse tables of tests/test_weight_names.py."""
from __future__ import annotations

import copy

import pytest
import torch

import test_evaluate_cli
from gains.checkpoint import CheckpointError, load_checkpoint, load_weights_for_finetune, make_checkpoint, read_checkpoint, save_checkpoint
from gains.convert_checkpoint import convert_checkpoint
from gains.inference import load_for_inference
from preprocess import main as checkpoint_main
from test_weight_names import SMALL, gains_case, quiet_build  # noqa: F401  (gains_case is a fixture)


def outputs(model, seed=0):
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()([img])[0]


def test_converted_checkpoint_round_trip(gains_case, tmp_path):
    cfg, model, d2, expected = gains_case
    src, dst = tmp_path / "model_final.pth", tmp_path / "converted.pth"
    torch.save({"model": d2, "iteration": 19999}, src)
    report, notes = convert_checkpoint(src, dst, cfg)
    ckpt = read_checkpoint(dst)
    assert ckpt["iteration"] == 20000 and ckpt["category_map"]["json_ids"] == [3, 7]
    assert ckpt["converted_from"]["format"] == "detectron2" and any("category map" in n for n in notes)
    direct = copy.deepcopy(model)
    direct.load_state_dict(expected)
    _, loaded, _ = load_for_inference(dst)
    a, b = outputs(direct), outputs(loaded)
    assert len(a["scores"]) > 0
    for k in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(a[k], b[k]), k
    save_checkpoint(make_checkpoint(loaded, iteration=1, config=cfg), tmp_path / "again.pth")
    again = quiet_build(cfg)
    load_checkpoint(tmp_path / "again.pth", again)
    c = outputs(again)
    assert all(torch.equal(a[k], c[k]) for k in ("boxes", "scores", "labels", "masks"))
    with pytest.raises(CheckpointError, match="convert it first"):  # resuming/evaluating needs the conversion
        load_checkpoint(src, again)
    assert not load_weights_for_finetune(again, src).missing  # init_weights=model_final.pth converts on the fly
    assert all(torch.equal(again.state_dict()[k], v) for k, v in expected.items())


def test_cli_convert_then_evaluate(gains_case, tmp_path, capsys):
    cfg, _, d2, _ = gains_case
    src, dst = tmp_path / "model_final.pth", tmp_path / "gains.pth"
    torch.save({"model": d2}, src)
    root = cfg.data.root
    args = ["--from-detectron2", str(src), "--out", str(dst), "--config", "configs/isbi_r50.yaml", f"data.root={root}",
            *SMALL]
    assert checkpoint_main(args + ["model.num_classes=1"]) == 1
    assert "set: model.num_classes=2" in capsys.readouterr().err and not dst.exists()
    assert checkpoint_main(args + ["model.input_format=RGB"]) == 1
    assert 'model.input_format="BGR"' in capsys.readouterr().err
    assert checkpoint_main(args) == 0
    printed = capsys.readouterr().out
    assert "dead guidance layer" in printed and f"wrote {dst}" in printed
    assert checkpoint_main(["--inspect-weights", str(src)]) == 0
    assert "model.num_classes=2" in capsys.readouterr().out
    out = tmp_path / "eval"
    assert test_evaluate_cli.cli.main(["--ckpt", str(dst), "--out", str(out)]) == 0
    assert (out / "metrics.json").is_file() and (out / "results_test.json").is_file()


def test_cli_says_what_the_conversion_needs(tmp_path, capsys):
    for args, needs in ((["--from-detectron2", str(tmp_path / "m.pth")], "needs --config CONFIG"),
                        (["--inspect-weights", "a.pth", "model.num_classes=2"], "go with --from-detectron2"),
                        (["--from-detectron2", "a.pth", "--inspect-weights", "a.pth"], "use one of")):
        with pytest.raises(SystemExit) as stop:
            checkpoint_main(args)
        assert stop.value.code == 2 and needs in capsys.readouterr().err
    assert checkpoint_main(["--inspect-weights", str(tmp_path / "none.pth")]) == 1
    assert "weights file not found" in capsys.readouterr().err
