"""Issue 11: every bad input ends in one clear line naming the culprit and the fix (gains/README.md, Habits).

One section per class of input: coordinates, COCO top-level keys, RLE, stale GA map files, corrupt and
truncated images, config value types, weights / checkpoint files, results files, and (issue 21 item 4) one
validator per kind of COCO file: the same DataError and message from every entry point. Each test failed
before the fix (a crash, a silent success, or a bare traceback without the id).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pycocotools import mask as mask_utils

from conftest import ROOT, load_script, square, uncompressed_rle, write_coco, write_png
from gains.checkpoint import CheckpointError, load_weights_for_finetune, read_checkpoint
from gains.annotations import DataError, check_segmentation, coordinate_tolerance, load_coco
from gains.config import BASE_CONFIG, TYPES, ConfigError, load_config
from gains.evaluation import evaluate_results
from gains.metrics import coco_evaluate

sys.path.insert(0, str(ROOT))
import preprocess  # noqa: E402

IMG = {"id": 7, "file_name": "a.png", "height": 30, "width": 40}
GAMM_ARGS = ["--variant", "isbi", "--window-size", "3", "--ga-factor", "0.5", "--overlap-hl", "0.1",
             "--target-category", "1"]


def ann(id=1, image_id=7, seg=None, **extra):
    return {"id": id, "image_id": image_id, "category_id": 1,
            "segmentation": seg if seg is not None else [square(5, 5, 10)], "iscrowd": 0, **extra}


def coco(tmp_path, anns, images=None, **kw):
    return write_coco(tmp_path, images or [dict(IMG)], anns, **kw)


def _limit_memory():  # the child may not grow past 4 GiB (before the fix a NaN polygon grew it to ~20 GB)
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


# ----------------------------------------------------------------------------------------------- coordinates
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_polygon_is_named(tmp_path, bad):
    poly = square(5, 5, 10)
    poly[2] = bad
    json_path, image_dir = coco(tmp_path, [ann(1), ann(3, seg=[poly])])
    with pytest.raises(DataError, match=r"train.json: annotation id 3 \(image 7\): polygon #0 has non-finite"):
        load_coco(json_path, image_dir)


def test_vertices_far_outside_the_image_are_refused_within_the_tolerance(tmp_path):
    assert coordinate_tolerance(30, 40) == (1.0, 1.0) and coordinate_tolerance(3000, 200) == (2.0, 30.0)
    ok = [[-0.5, -1.0, 41.0, 0.0, 41.0, 31.0, 0.0, 30.5]]  # border vertices a little outside: annotators do it
    json_path, image_dir = coco(tmp_path, [ann(1, seg=ok)])
    assert len(load_coco(json_path, image_dir)[0][0].annotations) == 1
    for far in ([5, 5, 1e5, 5, 5, 15], [5, 5, 15, 5, 5, -2.5]):
        json_path, image_dir = coco(tmp_path, [ann(2, seg=[far])])
        with pytest.raises(DataError, match=r"annotation id 2 \(image 7\): polygon #0 spans .* outside the 30x40 "
                                            r"\(HxW\) image by more than 1/1 px.*fix this annotation"):
            load_coco(json_path, image_dir)


@pytest.mark.parametrize("bbox, message", [([1, 2, float("nan"), 4], "non-finite"),
                                           ([1, 2, 1e5, 4], "outside the 30x40"),
                                           ("abc", "not a list of numbers")])
def test_bad_boxes_are_named(tmp_path, bbox, message):
    json_path, image_dir = coco(tmp_path, [ann(4, bbox=bbox)])
    with pytest.raises(DataError, match=rf"annotation id 4 \(image 7\): bbox .*{message}"):
        load_coco(json_path, image_dir)


def test_gamm_and_gt_scoring_refuse_non_finite_polygons():
    from gains.gamm import gamm_mask_crops
    with pytest.raises(ValueError, match="non-finite"):
        gamm_mask_crops([[[1.0, 1.0, float("nan"), 5.0, 5.0, 5.0]]], 30, 40)
    gt = {"images": [dict(IMG)], "categories": [{"id": 1, "name": "c"}],
          "annotations": [ann(1, seg=[[1.0, 1.0, float("nan"), 5.0, 5.0, 5.0]])]}
    with pytest.raises(DataError, match=r"gt.json: annotation id 1 \(image 7\): polygon #0 has non-finite"):
        evaluate_results(gt, [], gt_name="gt.json")


def test_preprocess_on_a_nan_polygon_exits_cleanly(tmp_path):
    """Before: pycocotools grew the process to ~20 GB and it died of SIGSEGV."""
    poly = square(5, 5, 10)
    poly[3] = float("nan")
    json_path, image_dir = coco(tmp_path, [ann(1), ann(2, seg=[poly])])
    proc = subprocess.run([sys.executable, str(ROOT / "preprocess.py"), "--json", str(json_path), "--images",
                           str(image_dir), *GAMM_ARGS], capture_output=True, text=True, timeout=120,
                          preexec_fn=_limit_memory)
    assert proc.returncode == 2, proc.stderr
    assert "preprocess.py: error:" in proc.stderr and "annotation id 2 (image 7)" in proc.stderr
    assert "non-finite" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------- COCO keys
@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_or_non_list_top_level_key_is_named(tmp_path, key):
    json_path, image_dir = coco(tmp_path, [ann()])
    data = json.loads(json_path.read_text())
    del data[key]
    json_path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"train.json: missing top-level '{key}'"):
        load_coco(json_path, image_dir)
    data[key] = {"oops": 1}
    json_path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"train.json: top-level '{key}' is a dict, not a list"):
        load_coco(json_path, image_dir)


def test_empty_annotations_list_stays_valid_and_top_level_must_be_a_mapping(tmp_path):
    json_path, image_dir = coco(tmp_path, [])
    records, _, _ = load_coco(json_path, image_dir)
    assert records[0].annotations == []
    json_path.write_text("[1, 2]")
    with pytest.raises(DataError, match="train.json: the top level is a list"):
        load_coco(json_path, image_dir)


# ----------------------------------------------------------------------------------------------- RLE
def _rle(h=30, w=40):
    m = np.zeros((h, w), np.uint8, order="F")
    m[2:6, 3:9] = 1
    return m, mask_utils.encode(m)


def test_rle_size_and_run_sums_are_checked(tmp_path):
    m, rle = _rle()
    good = {"size": [30, 40], "counts": rle["counts"].decode()}
    other = mask_utils.encode(np.asfortranarray(np.pad(m, ((0, 2), (0, 0)))))
    unc = uncompressed_rle(m)
    cases = [
        ({"size": [32, 40], "counts": other["counts"].decode()}, r"RLE size \[32, 40\] differs .* re-encode"),
        ({"size": [30, 40], "counts": other["counts"].decode()}, r"compressed RLE runs sum to 1280 pixels but "
                                                                 r"the image has 30x40 = 1200"),
        ({"size": [30, 40], "counts": "0P"}, "not a valid COCO RLE string"),   # dangling continuation group
        ({**unc, "counts": unc["counts"] + [5]}, "uncompressed RLE runs sum to 1205"),
        ({**unc, "counts": [-5] + unc["counts"][1:] + [5]}, "negative run length"),
        ({**unc, "counts": ["a"] + unc["counts"][1:]}, "counts hold 'a'"),
    ]
    for n, (seg, message) in enumerate(cases):
        json_path, image_dir = coco(tmp_path, [ann(1, seg=good), ann(5, seg=seg)])
        with pytest.raises(DataError, match=rf"annotation id 5 \(image 7\): .*{message}"):
            load_coco(json_path, image_dir)
    json_path, image_dir = coco(tmp_path, [ann(1, seg=good), ann(2, seg=unc)])
    a1, a2 = load_coco(json_path, image_dir)[0][0].annotations
    assert a1.area == a2.area == m.sum()


def test_compressed_rle_decoder_matches_pycocotools():
    """The validator's own decoder of compressed counts gives the runs of the mask pycocotools encoded
    (the runs are read off the mask by conftest's loop, not by the code under test)."""
    from gains.annotations import _rle_string_counts
    from tests.conftest import uncompressed_rle
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(1, 60, 2)
        m = np.asfortranarray((rng.random((h, w)) < rng.random()).astype(np.uint8))
        rle = mask_utils.encode(m)
        assert [int(r) for r in _rle_string_counts(rle["counts"])] == uncompressed_rle(m)["counts"]
        assert np.array_equal(mask_utils.decode(rle), m)  # the oracle's mask is pycocotools' mask
        check_segmentation({"size": [int(h), int(w)], "counts": rle["counts"]}, int(h), int(w), "x")
    with pytest.raises(DataError, match="x: compressed RLE runs sum"):
        check_segmentation({"size": [3, 4], "counts": mask_utils.encode(np.ones((4, 4), np.uint8, "F"))["counts"]},
                           3, 4, "x")


# ----------------------------------------------------------------------------------------------- stale map files
def test_existing_map_of_the_wrong_shape_is_an_error_unless_overwrite(tmp_path, capsys):
    from gains.ga_store import GAMapStore, GammParams
    json_path, image_dir = coco(tmp_path, [ann(1), ann(2, seg=[square(12, 8, 9)])])
    records, _, _ = load_coco(json_path, image_dir)
    params = GammParams("isbi", 3, 0.5, 0.1, 1)
    args = ["--json", str(json_path), "--images", str(image_dir), *GAMM_ARGS, "--out", str(tmp_path)]
    for layout in ("authors", "compact"):
        store = GAMapStore(tmp_path / params.folder_name, params, layout=layout)
        store.map_dir.mkdir(parents=True, exist_ok=True)
        for f in store.map_dir.iterdir():
            f.unlink()
        if layout == "authors":
            np.save(store.path(1), np.ones((20, 20), np.float32))
            stale, message = store.path(1), r"GA map of annotation 1 is \(20, 20\), but image 7 is \(30, 40\)"
        else:
            other = type(records[0])(7, records[0].path, 20, 20, records[0].annotations)
            GAMapStore(store.map_dir, params, layout="compact").write_image_maps(other)
            stale, message = store.image_path(7), r"GA maps of image 7 are for a \(20, 20\) image"
        with pytest.raises(DataError, match=rf"{stale.name}: {message}.*--overwrite"):
            store.missing(records[0])
        assert preprocess.main(args + ["--layout", layout]) == 2
        err = capsys.readouterr().err
        assert f"preprocess.py: error: {stale}" in err and "--overwrite" in err
        assert preprocess.main(args + ["--layout", layout, "--overwrite"]) == 0
        assert store.missing(records[0]) == []
        capsys.readouterr()


def test_unreadable_compact_map_file_is_named(tmp_path):
    from gains.ga_store import GAMapStore, GammParams
    json_path, image_dir = coco(tmp_path, [ann(1)])
    record = load_coco(json_path, image_dir)[0][0]
    store = GAMapStore(tmp_path / "maps", GammParams("isbi", 3, 0.5, 0.1, 1))
    store.map_dir.mkdir()
    store.image_path(7).write_bytes(b"PK\x03\x04 not really a zip")
    for call in (store.missing, lambda r: store.crops(r, [1])):
        with pytest.raises(DataError, match=r"image_7.npz: unreadable GA map file of image 7.*--overwrite"):
            call(record)


# ----------------------------------------------------------------------------------------------- images
def _broken_images(tmp_path, kind):
    """A 64x64 data set whose image 7 is `kind`: corrupt (garbage bytes) or truncated, as PNG and TIFF."""
    import tifffile
    images = [{"id": 7, "file_name": "a.png", "height": 64, "width": 64},
              {"id": 8, "file_name": "b.tif", "height": 64, "width": 64}]
    anns = [ann(1, image_id=7, seg=[square(5, 5, 20)]), ann(2, image_id=8, seg=[square(5, 5, 20)])]
    json_path, image_dir = write_coco(tmp_path, images[:1], anns[:1])
    json_path.write_text(json.dumps({"images": images, "annotations": anns,
                                     "categories": [{"id": 1, "name": "cell"}]}))
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    tifffile.imwrite(image_dir / "b.tif", pixels)
    for name in ("a.png", "b.tif"):
        data = (image_dir / name).read_bytes()
        (image_dir / name).write_bytes(b"not an image at all " * 10 if kind == "corrupt" else data[:len(data) // 2])
    return json_path, image_dir


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_broken_images_name_the_file_and_the_image_id(tmp_path, kind):
    from gains.data import InstanceDataset
    from gains.transforms import EvalTransform
    json_path, image_dir = _broken_images(tmp_path, kind)
    message = r"image id 7: .*a.png: cannot (read the image header|decode the image) .* copy it again"
    with pytest.raises(DataError, match=message):
        load_coco(json_path, image_dir, check_pixels=True)
    if kind == "corrupt":  # the header check at load already refuses it
        with pytest.raises(DataError, match=message):
            load_coco(json_path, image_dir)
        return
    records, cmap, _ = load_coco(json_path, image_dir)  # header fine: caught when decoded
    dataset = InstanceDataset(records, cmap, EvalTransform(64, 64))
    for i, name in enumerate(["a.png", "b.tif"]):
        with pytest.raises(DataError, match=rf"image id {7 + i}: .*{name}: cannot decode the image"):
            dataset[i]


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_preprocess_and_train_print_one_line_for_broken_images(tmp_path, capsys, kind):
    json_path, image_dir = _broken_images(tmp_path, kind)
    assert preprocess.main(["--json", str(json_path), "--images", str(image_dir), *GAMM_ARGS]) == 2
    err = capsys.readouterr().err
    assert "preprocess.py: error:" in err and "image id 7" in err and "a.png" in err and "copy it again" in err
    train_cli = load_script("train")
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path}", "data.val_json=train.json",
                 "data.val_images=train", "device=cpu", "model.mode=mask_rcnn", "model.num_classes=1",
                 "data.num_workers=1", "data.min_size_train=[64]", "data.max_size_train=64",
                 "model.backbone.depth=18", "model.backbone.norm=gn", "model.backbone.fpn_channels=16",
                 "model.roi_heads.fc_dim=16", "model.roi_heads.mask_conv_dim=8", "solver.max_iter=1",
                 "test.eval_at_end=false"]
    det = torch.are_deterministic_algorithms_enabled()
    try:
        assert train_cli.main([str(BASE_CONFIG), *overrides]) == 1
    finally:
        torch.use_deterministic_algorithms(det)
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error:") and len(err.splitlines()) == 1, err  # not the worker's traceback
    assert re.search(r"image id (7: .*a\.png|8: .*b\.tif)", err) and "Traceback" not in err, err


# ----------------------------------------------------------------------------------------------- config types
@pytest.mark.parametrize("override, message", [
    ("solver.max_iter=abc", "solver.max_iter='abc' is not an integer (e.g. 20000)"),
    ("solver.base_lr=fast", "solver.base_lr='fast' is not a finite number (e.g. 0.015)"),
    ("solver.base_lr=.nan", "solver.base_lr=nan is not a finite number (e.g. 0.015)"),
    ("deterministic=1", "deterministic=1 is not true or false (e.g. false)"),
    ("solver.steps=[100, x]", "solver.steps=[100, 'x'] is not a list of integers (e.g. [15000, 18000])"),
    ("data.crop_size=[1, 2, 3]", "data.crop_size=[1, 2, 3] is not an integer or a list of 2 integers or null"),
    ("data.intensity_scale=0.5", "data.intensity_scale=0.5 is not a list of 2 finite numbers or null"),
    ("model.backbone.weights=[a]", "model.backbone.weights=['a'] is not a string or null"),
    ("test.detections_per_tile=many", "test.detections_per_tile='many' is not an integer or null (e.g. 300)"),
    ("device=[cpu]", "device=['cpu'] is not a string (e.g. auto)"),
])
def test_override_of_the_wrong_type_is_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == f"command-line override: {message}"


def test_accepted_forms_of_multi_form_keys():
    cfg = load_config(None, ["data.min_size_train=800", "data.crop_size=256", "data.intensity_scale=[0.8, 1]",
                             "solver.base_lr=1", "model.alrm.mask_loss_weight=0.5", "test.detections_per_tile=null",
                             "output_dir=2024", "model.pixel_mean=[100, 110, 120]", "solver.steps=[]"])
    assert (cfg.data.min_size_train, cfg.data.crop_size, cfg.data.intensity_scale) == (800, 256, [0.8, 1])
    assert cfg.output_dir == "2024" and cfg.test.detections_per_tile is None and cfg.solver.steps == []
    cfg = load_config(None, ["data.crop_size=[64, 96]", "init_weights=x.pth", "gamm.map_dir=maps",
                             "data.min_size_train=[64, 96]"])
    assert cfg.data.crop_size == [64, 96] and cfg.init_weights == "x.pth"


def test_yaml_file_values_are_checked_too(tmp_path):
    (tmp_path / "c.yaml").write_text(f"_base_: {BASE_CONFIG}\nsolver:\n  max_iter: lots\n")
    with pytest.raises(ConfigError, match=r"c.yaml: solver.max_iter='lots' is not an integer"):
        load_config(tmp_path / "c.yaml")


def test_every_null_default_declares_its_type():
    base = yaml.safe_load(BASE_CONFIG.read_text())

    def leaves(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    found = dict(leaves(base))
    assert {k for k, v in found.items() if v is None} <= set(TYPES)
    assert set(TYPES) <= set(found), "TYPES names keys base.yaml no longer has"
    for key, default in found.items():  # every default satisfies its own declared type
        load_config(None, [f"{key}={json.dumps(default)}"])


def test_train_cli_prints_the_type_error_in_one_line(capsys):
    train_cli = load_script("train")
    assert train_cli.main([str(BASE_CONFIG), "solver.max_iter=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "train.py: error: command-line override: solver.max_iter='abc' is not an integer (e.g. 20000)"


# ----------------------------------------------------------------------------------------------- weights files
class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_weight_files(tmp_path):
    _Evil.marker = str(tmp_path / "PWNED")
    files = {}
    files["text.pth"] = tmp_path / "text.pth"
    files["text.pth"].write_text("hello, I am a README")
    files["empty.pth"] = tmp_path / "empty.pth"
    files["empty.pth"].write_bytes(b"")
    files["evil.pth"] = tmp_path / "evil.pth"
    torch.save({"model": _Evil()}, files["evil.pth"])
    files["evil_pickle.pth"] = tmp_path / "evil_pickle.pth"
    files["evil_pickle.pth"].write_bytes(pickle.dumps({"model": _Evil()}))
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "good.pth")
    files["truncated.pth"] = tmp_path / "truncated.pth"
    files["truncated.pth"].write_bytes((tmp_path / "good.pth").read_bytes()[:300])
    return files


def _assert_safe_refusal(e: BaseException, path: Path):
    text = str(e)
    assert str(path) in text and "expected" in text and "\n" not in text
    assert "weights_only" not in text and "arbitrary code execution" not in text.lower()


def test_non_checkpoint_and_malicious_weights_are_refused_in_one_line(tmp_path):
    from gains.backbone import ResNetFPN
    for name, path in _bad_weight_files(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            ResNetFPN(18, norm="gn", weights=str(path))
        _assert_safe_refusal(info.value, path)
        assert "ImageNet ResNet state dict" in str(info.value), name
        for load in (read_checkpoint, lambda p: load_weights_for_finetune(torch.nn.Linear(2, 2), p)):
            with pytest.raises(CheckpointError) as info:
                load(path)
            _assert_safe_refusal(info.value, path)
    assert not (tmp_path / "PWNED").exists()  # nothing in the files ran
    with pytest.raises(CheckpointError, match="evil_pickle.pth: corrupt, or not a file written by torch.save"):
        read_checkpoint(tmp_path / "evil_pickle.pth")  # a plain pickle: refused before any object is built
    with pytest.raises(CheckpointError, match=r"cannot read backbone weights \(model.backbone.weights\) .*evil.pth: "
                                              r"it holds pickled Python objects \(posix.system\)"):
        ResNetFPN(18, norm="gn", weights=str(tmp_path / "evil.pth"))


def test_evaluate_cli_refuses_a_malicious_ckpt_in_one_line(tmp_path, capsys):
    evaluate_cli = load_script("evaluate")
    path = _bad_weight_files(tmp_path)["evil.pth"]
    assert evaluate_cli.main(["--ckpt", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"evaluate.py: error: cannot read checkpoint {path}: it holds pickled Python objects "
                          "(posix.system)") and "\n" not in err
    assert "weights_only" not in err and not (tmp_path / "PWNED").exists()


def test_train_cli_refuses_bad_backbone_weights_and_init_weights_in_one_line(tmp_path, capsys):
    from gains.synthetic import make_synthetic_dataset
    train_cli = load_script("train")
    files = _bad_weight_files(tmp_path)
    make_synthetic_dataset(tmp_path / "data", num_train=2, num_val=1, num_test=1, image_size=(64, 64))
    base = [str(BASE_CONFIG), f"output_dir={tmp_path / 'run'}", "device=cpu", "model.backbone.depth=18",
            "model.backbone.norm=gn", f"data.root={tmp_path / 'data'}", "model.mode=mask_rcnn",
            "data.num_workers=0", "model.backbone.fpn_channels=16", "model.roi_heads.fc_dim=16",
            "model.roi_heads.mask_conv_dim=8"]
    det = torch.are_deterministic_algorithms_enabled()
    try:
        for key in ("model.backbone.weights", "init_weights"):
            assert train_cli.main(base + [f"{key}={files['evil.pth']}"]) == 1
            err = capsys.readouterr().err.strip()
            assert err.startswith("train.py: error:") and len(err.splitlines()) == 1, err
            assert "evil.pth" in err and "weights_only" not in err
    finally:
        torch.use_deterministic_algorithms(det)
    assert not (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------------------------------------- results files
def _gt_and_result():
    m, rle = _rle()
    gt = {"images": [dict(IMG)], "categories": [{"id": 1, "name": "c"}],
          "annotations": [ann(1, seg={"size": [30, 40], "counts": rle["counts"].decode()})]}
    return gt, {"image_id": 7, "category_id": 1, "score": 0.9,
                "segmentation": {"size": [30, 40], "counts": rle["counts"].decode()}}


@pytest.mark.parametrize("score", [float("nan"), float("inf"), "high", None])
def test_bad_score_names_the_image_id(score):
    gt, ok = _gt_and_result()
    with pytest.raises(DataError, match=r"res.json: result #1 \(image id 7, category 1\) has score"):
        evaluate_results(gt, [ok, {**ok, "score": score}], results_name="res.json")


def test_results_file_that_is_not_a_list_is_named(tmp_path, capsys):
    evaluate_cli = load_script("evaluate")
    gt, ok = _gt_and_result()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    pred = tmp_path / "pred.json"
    for content, message in [({"annotations": [ok]}, f"{pred}: the top level is a dict, not a list"),
                             ([{**ok, "score": float("nan")}], f"{pred}: result #0 (image id 7, category 1) "
                                                               "has score nan")]:
        pred.write_text(json.dumps(content))
        assert evaluate_cli.main(["--gt", str(tmp_path / "gt.json"), "--pred", str(pred)]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


# ----------------------------------------------------------------------------------------------- one validator
# Issue 21 item 4: a malformed ground truth or results list gets the same DataError and message whichever entry
# point reads it (load_coco for training, evaluation.evaluate_results, metrics.coco_evaluate): one code path.
def _json_rle(h: int, w: int) -> dict:
    """A compressed RLE of an h x w mask as json holds it (string counts)."""
    return {"size": [h, w], "counts": _rle(h, w)[1]["counts"].decode()}


def _drop(d: dict, key: str) -> None:
    del d[key]


GT_CASES = {  # name -> (mutation of a valid ground truth, what the message must say)
    "not a mapping": (lambda gt: [gt], r"the top level is a list, not a COCO instances mapping"),
    "no annotations key": (lambda gt: _drop(gt, "annotations"), r"missing top-level 'annotations'"),
    "images not a list": (lambda gt: gt.update(images={"7": IMG}), r"top-level 'images' is a dict, not a list"),
    "no category": (lambda gt: gt.update(categories=[]), r"'categories' is empty"),
    "duplicate category id": (lambda gt: gt["categories"].append({"id": 1, "name": "d"}),
                              r"duplicate category ids \(1, 1\); category ids must be unique"),
    "string image id": (lambda gt: gt["images"][0].update(id="7"), r"image #0 \('a.png'\) id is '7', not a"),
    "duplicate image id": (lambda gt: gt["images"].append(dict(IMG)), r"duplicate image id 7; image ids must be"),
    "no height": (lambda gt: _drop(gt["images"][0], "height"), r"image id 7 height is None, not a \(64-bit\) integer"),
    "zero width": (lambda gt: gt["images"][0].update(width=0), r"image id 7 is 30x0 \(HxW\) in the json"),
    "annotation id 0": (lambda gt: gt["annotations"][0].update(id=0),
                        r"annotation #0 \(image 7\) has id 0; annotation ids must be integers >= 1"),
    "no annotation id": (lambda gt: _drop(gt["annotations"][0], "id"), r"annotation #0 \(image 7\) has id None"),
    "duplicate annotation id": (lambda gt: gt["annotations"].append(ann(1)), r"duplicate annotation id 1"),
    "unknown image": (lambda gt: gt["annotations"][0].update(image_id=8),
                      r"annotation id 1 refers to image id 8, which is not in 'images'"),
    "unknown category": (lambda gt: gt["annotations"][0].update(category_id=2),
                         r"annotation id 1 has category_id 2, not among the declared categories \[1\]"),
    "iscrowd 2": (lambda gt: gt["annotations"][0].update(iscrowd=2), r"annotation id 1 \(image 7\): iscrowd is 2"),
    "negative area": (lambda gt: gt["annotations"][0].update(area=-1), r"annotation id 1 \(image 7\): area is -1"),
    "bbox outside": (lambda gt: gt["annotations"][0].update(bbox=[30, 0, 20, 5]),
                     r"annotation id 1 \(image 7\): bbox \[30, 0, 20, 5\] \(xywh\) lies outside"),
    "NaN polygon": (lambda gt: gt["annotations"][0].update(segmentation=[[1.0, 1.0, float("nan"), 5.0, 5.0, 5.0]]),
                    r"annotation id 1 \(image 7\): polygon #0 has non-finite coordinates"),
    "RLE of another size": (lambda gt: gt["annotations"][0].update(segmentation=_json_rle(20, 20)),
                            r"annotation id 1 \(image 7\): RLE size \[20, 20\] differs from the image size"),
}


def _message(call) -> str:
    """The DataError message of call(); any other outcome fails the test."""
    with pytest.raises(DataError) as err:
        call()
    assert type(err.value) is DataError, type(err.value)
    return str(err.value)


def _ground_truth(tmp_path):
    """A valid ground truth (image 7, 30x40, one polygon annotation) written with its image; (path, dirs, dict)."""
    json_path, image_dir = coco(tmp_path, [ann(1)])
    return json_path, image_dir, json.loads(json_path.read_text())


@pytest.mark.parametrize("case", GT_CASES)
def test_bad_ground_truth_gives_one_message_through_every_entry_point(tmp_path, case):
    mutate, expected = GT_CASES[case]
    json_path, image_dir, gt = _ground_truth(tmp_path)
    gt = mutate(gt) or gt  # a mutation changes the dict in place (None) or returns a new top level
    json_path.write_text(json.dumps(gt))
    name = str(json_path)
    messages = {"load_coco": _message(lambda: load_coco(json_path, image_dir)),
                "evaluate_results": _message(lambda: evaluate_results(gt, [], gt_name=name)),
                "coco_evaluate": _message(lambda: coco_evaluate(gt, [], gt_name=name))}
    assert len(set(messages.values())) == 1, messages
    assert re.match(rf"{re.escape(name)}: .*{expected}", messages["load_coco"]), messages["load_coco"]


def _result(**changes) -> dict:
    return {"image_id": 7, "category_id": 1, "score": 0.9, "segmentation": _json_rle(30, 40), **changes}


RESULT_CASES = {  # name -> (results list, what the message must say)
    "not a list": ({"annotations": [_result()]}, r"the top level is a dict, not a list"),
    "not a dict": ([_result(), [7, 1, 0.9]], r"result #1 is a list \(\[7, 1, 0.9\]\), not a dict"),
    "no score": ([_result(), {k: v for k, v in _result().items() if k != "score"}], r"result #1 lacks score"),
    "no segmentation": ([{k: v for k, v in _result().items() if k != "segmentation"}], r"result #0 lacks segmentation"),
    "string image id": ([_result(image_id="7")], r"result #0 has image_id '7'; use the ground truth's"),
    "bool category id": ([_result(category_id=True)], r"result #0 \(image id 7\) has category_id True"),
    "NaN score": ([_result(score=float("nan"))], r"result #0 \(image id 7, category 1\) has score nan"),
    "short bbox": ([_result(bbox=[1, 2, 3])], r"result #0 \(image id 7, category 1\) has bbox \[1, 2, 3\]"),
    "unknown image": ([_result(), _result(image_id=99)], r"results refer to image ids \[99\] that are not in the"),
    "unknown category": ([_result(category_id=2)], r"results use category ids \[2\] that the ground truth does not"),
    "RLE of another size": ([_result(segmentation=_json_rle(20, 20))],
                            r"result #0 \(image id 7\): RLE size \[20, 20\] differs from the image size"),
    "RLE runs short": ([_result(segmentation={"size": [30, 40], "counts": [5, 10]})],
                       r"result #0 \(image id 7\): uncompressed RLE runs sum to 15 pixels"),
    "empty segmentation": ([_result(segmentation=[])], r"result #0 \(image id 7\): no segmentation"),
    "2-point polygon": ([_result(segmentation=[[1, 1, 9, 9]])],
                        r"result #0 \(image id 7\): polygon #0 has 4 coordinates"),
}


@pytest.mark.parametrize("case", RESULT_CASES)
def test_bad_results_give_one_message_through_every_entry_point(tmp_path, case):
    results, expected = RESULT_CASES[case]
    gt = _ground_truth(tmp_path)[2]
    messages = {"evaluate_results": _message(lambda: evaluate_results(gt, results, results_name="res.json")),
                "coco_evaluate": _message(lambda: coco_evaluate(gt, results, results_name="res.json"))}
    assert len(set(messages.values())) == 1, messages
    assert re.match(rf"res\.json: .*{expected}", messages["coco_evaluate"]), messages["coco_evaluate"]


def test_scoring_refuses_what_training_drops(tmp_path):
    """An annotation without a segmentation or with a 2-point polygon: load_coco drops it with a counted warning
    (training loses one instance); both scorers refuse it, as dropping it would change the scores unseen."""
    json_path, image_dir = coco(tmp_path, [ann(1), ann(2, seg=[]), ann(3, seg=[[1, 1, 9, 9]])])
    with pytest.warns(UserWarning, match="annotations with an empty segmentation dropped"):
        records = load_coco(json_path, image_dir)[0]
    assert [a.id for a in records[0].annotations] == [1]
    gt, name = json.loads(json_path.read_text()), str(json_path)
    for call in (lambda: evaluate_results(gt, [], gt_name=name), lambda: coco_evaluate(gt, [], gt_name=name)):
        assert _message(call).startswith(f"{name}: annotation id 2 (image 7): no segmentation")
    gt["annotations"].pop(1)
    for call in (lambda: evaluate_results(gt, [], gt_name=name), lambda: coco_evaluate(gt, [], gt_name=name)):
        assert _message(call).startswith(f"{name}: annotation id 3 (image 7): polygon #0 has 4 coordinates")


def test_flat_polygons_and_null_boxes_score_as_in_training(tmp_path):
    """What the validator accepts, every scorer reads: a flat (unwrapped) polygon and a null result bbox."""
    gt = _ground_truth(tmp_path)[2]
    poly = square(5, 5, 10)
    gt["annotations"][0]["segmentation"] = poly  # flat, as load_coco accepts
    results = [_result(segmentation=poly, bbox=None)]
    assert evaluate_results(gt, results)["mAP"] == pytest.approx(100)
    assert coco_evaluate(gt, results)["stats"][0] == pytest.approx(1)
