"""preprocess.py end to end: presets, the authors' map layout, skipping, overwrite, failures, overlays, and
the data set's on-the-fly maps."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURES, ellipse, write_coco

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import preprocess  # noqa: E402

from gains.config import load_config  # noqa: E402
from gains.data import build_dataset  # noqa: E402


def fixture_args(name, out, layout="authors"):
    params = json.loads((FIXTURES / "gamm" / name / "params.json").read_text())
    return ["--json", str(FIXTURES / "gamm" / name / "annotations.json"),
            "--images", str(FIXTURES / "gamm" / name / "images"),
            "--variant", params["variant"], "--window-size", str(params["window_size"]),
            "--ga-factor", str(params["ga_factor"]), "--overlap-hl", str(params["overlap_hl"]),
            "--target-category", str(params["target_category_id"]), "--out", str(out), "--layout", layout]


@pytest.mark.parametrize("name, folder", [("chrom_rods", "anomap_ws5_f0.5_ol0.3"),
                                          ("isbi_cells", "anomap_ws9_f0.5_ol0.1")])
def test_cli_writes_the_authors_maps(tmp_path, capsys, name, folder):
    assert preprocess.main(fixture_args(name, tmp_path)) == 0
    expected = sorted((FIXTURES / "gamm" / name / "expected").glob("*.npy"))
    written = sorted((tmp_path / folder).glob("*.npy"))
    assert [p.name for p in written] == [p.name for p in expected]
    for e in expected:
        ours = np.load(tmp_path / folder / e.name)
        assert ours.dtype == np.float32 and ours.shape == np.load(e).shape
        assert np.abs(ours.astype(np.float64) - np.load(e)).max() <= 1e-5, e.name
    out = capsys.readouterr().out
    assert f"maps written: {len(expected)}" in out and "time:" in out


@pytest.mark.parametrize("name, folder", [("chrom_rods", "anomap_ws5_f0.5_ol0.3"),
                                          ("isbi_cells", "anomap_ws9_f0.5_ol0.1"),
                                          ("nuclei_clusters", "anomap_ws8_f0.8_ol0.1")])
def test_compact_layout_is_lossless_and_smaller(tmp_path, name, folder):
    """The default layout holds the very float32 maps of the authors' layout, in fewer bytes."""
    from gains.annotations import load_coco
    from gains.ga_store import GAMapStore, GammParams, load_compact

    assert preprocess.main(fixture_args(name, tmp_path / "c", layout="compact")) == 0
    assert preprocess.main(fixture_args(name, tmp_path / "a", layout="authors")) == 0
    compact, authors = tmp_path / "c" / folder, tmp_path / "a" / folder
    assert not list(compact.glob("*.npy")) and list(compact.glob("image_*.npz"))
    records, _, _ = load_coco(FIXTURES / "gamm" / name / "annotations.json", FIXTURES / "gamm" / name / "images")
    p = json.loads((FIXTURES / "gamm" / name / "params.json").read_text())
    store = GAMapStore(compact, GammParams(p["variant"], p["window_size"], p["ga_factor"], p["overlap_hl"],
                                           p["target_category_id"]), on_the_fly=False)
    for record in records:
        ids = [a.id for a in record.annotations]
        dense = store.maps(record, ids)
        sparse = store.sparse_maps(record, ids).dense().numpy()
        for i, a in enumerate(ids):
            written = np.load(authors / f"{a}.npy")
            assert np.array_equal(dense[i], written) and np.array_equal(sparse[i], written), a  # bitwise
        crops, size = load_compact(store.image_path(record.image_id))
        assert size == (record.height, record.width) and sorted(crops) == sorted(ids)
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())  # noqa: E731
    assert size(compact) < size(authors) / 2


def test_cli_skips_finished_files_unless_overwrite(tmp_path, capsys):
    args = fixture_args("chrom_rods", tmp_path)
    preprocess.main(args)
    folder = tmp_path / "anomap_ws5_f0.5_ol0.3"
    marker = np.full(np.load(folder / "1.npy").shape, 7.0, np.float32)  # right shape (a wrong one is an error)
    np.save(folder / "1.npy", marker)
    capsys.readouterr()
    assert preprocess.main(args) == 0
    assert "maps written: 0" in capsys.readouterr().out
    assert np.array_equal(np.load(folder / "1.npy"), marker)  # kept
    (folder / "2.npy").unlink()
    preprocess.main(args)
    assert "maps written: 1" in capsys.readouterr().out  # only the missing map is written
    assert np.array_equal(np.load(folder / "1.npy"), marker)  # ...but an existing file is not rewritten
    preprocess.main(args + ["--overwrite", "--dtype", "float16"])
    assert np.load(folder / "1.npy").dtype == np.float16 and not (np.load(folder / "1.npy") == 7).all()
    assert not [p for p in folder.iterdir() if p.suffix != ".npy" and p.name != "gamm_manifest.json"]  # no tmp files


def test_cli_workers_and_visualize(tmp_path, capsys):
    assert preprocess.main(fixture_args("nuclei_clusters", tmp_path) + ["--workers", "2", "--visualize", "2"]) == 0
    folder = tmp_path / "anomap_ws8_f0.8_ol0.1"
    n_expected = len(list((FIXTURES / "gamm" / "nuclei_clusters" / "expected").glob("*.npy")))
    assert len(list(folder.glob("*.npy"))) == n_expected
    pngs = list((tmp_path / "anomap_ws8_f0.8_ol0.1_vis").glob("*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 1000 for p in pngs)


def test_presets_fill_the_authors_values():
    a = preprocess.parse_args(["--dataset", "isbi"])
    assert (a.variant, a.window_size, a.ga_factor, a.overlap_hl, a.target_category) == ("isbi", 5, 0.5, 0.1, 0)
    assert a.json == Path("data/isbi2014/train.json")
    a = preprocess.parse_args(["--dataset", "ucoc"])
    assert (a.variant, a.window_size, a.ga_factor, a.overlap_hl, a.target_category) == ("chrom", 5, 0.5, 0.3, 1)
    a = preprocess.parse_args(["--dataset", "kaggle", "--window-size", "6"])
    assert (a.variant, a.window_size, a.ga_factor, a.overlap_hl, a.target_category) == ("nuclei", 6, 0.8, 0.1, 1)


def test_missing_flags_and_bad_inputs_are_explained(tmp_path, capsys):
    with pytest.raises(SystemExit):
        preprocess.parse_args(["--json", "a.json"])
    assert "missing --images --variant" in capsys.readouterr().err
    assert preprocess.main(fixture_args("chrom_rods", tmp_path)[:-2] + ["--target-category", "5"]) == 2
    assert "--target-category 5 is not a category" in capsys.readouterr().err
    args = fixture_args("chrom_rods", tmp_path)
    args[1] = str(tmp_path / "nope.json")
    assert preprocess.main(args) == 2
    assert "annotation file not found" in capsys.readouterr().err


def test_failing_image_is_reported_and_others_still_written(tmp_path, capsys, monkeypatch):
    import gains.ga_store as store_module
    real = store_module.compute_image_crops

    def flaky(record, params):
        if record.image_id == 2:
            raise RuntimeError("boom on purpose")
        return real(record, params)

    monkeypatch.setattr(store_module, "compute_image_crops", flaky)
    assert preprocess.main(fixture_args("chrom_rods", tmp_path)) == 1
    err = capsys.readouterr().err
    assert "FAILED image 2: RuntimeError: boom on purpose" in err
    assert len(list((tmp_path / "anomap_ws5_f0.5_ol0.3").glob("*.npy"))) == 9 - 2  # image 2 has 2 annotations


def _overlap_set(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 48, "width": 56}]
    anns = [{"id": 11, "image_id": 1, "category_id": 1, "segmentation": [ellipse(20, 24, 12, 9)], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 1, "segmentation": [ellipse(34, 24, 12, 9)], "iscrowd": 0}]
    return write_coco(tmp_path, images, anns)


def test_dataset_computes_maps_on_the_fly_and_caches_them(tmp_path):
    _overlap_set(tmp_path)
    cfg = load_config(None, [f"data.root={tmp_path}", "model.num_classes=1", "gamm.target_category_id=1",
                             "data.min_size_train=[48]", "data.hflip_prob=0.0"])
    dataset = build_dataset(cfg, "train", is_train=True)
    image, target = dataset[0]
    folder = tmp_path / "train" / "anomap_ws5_f0.5_ol0.1"
    assert sorted(p.name for p in folder.iterdir()) == ["gamm_manifest.json", "image_1.npz"]  # compact: one file
    assert target["ga"].shape == target["masks"].shape == (2, 48, 56)
    ga = target["ga"].dense()
    assert ga.min() >= 1.0 and ga.max() > 1.05  # the overlap is marked
    # the cached file is what the next epoch reads (replace it by authors' files and see them win... no:
    # a compact file is read first; delete it and put an authors' file instead)
    (folder / "image_1.npz").unlink()
    np.save(folder / "11.npy", np.full((48, 56), 1.25, np.float32))
    _, again = dataset[0]
    assert torch.allclose(again["ga"].dense()[0], torch.full((48, 56), 1.25))
    assert (folder / "image_1.npz").is_file()  # 12 was missing: the image's maps were computed again
    # mask_rcnn mode needs no maps at all
    cfg = load_config(None, [f"data.root={tmp_path}", "model.num_classes=1", "model.mode=mask_rcnn"])
    assert "ga" not in build_dataset(cfg, "train", is_train=True)[0][1]


def test_dataset_without_on_the_fly_asks_for_preprocess(tmp_path):
    _overlap_set(tmp_path)
    cfg = load_config(None, [f"data.root={tmp_path}", "model.num_classes=1", "gamm.target_category_id=1",
                             "gamm.on_the_fly=false"])
    from gains.annotations import DataError
    with pytest.raises(DataError, match="preprocess.py"):
        build_dataset(cfg, "train", is_train=True)[0]


def test_unwritable_map_folder_keeps_maps_in_memory(tmp_path, monkeypatch):
    _overlap_set(tmp_path)
    cfg = load_config(None, [f"data.root={tmp_path}", "model.num_classes=1", "gamm.target_category_id=1"])
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # no folder anywhere is writable
    with pytest.warns(UserWarning, match="not writable; maps computed on the fly are kept in memory"):
        dataset = build_dataset(cfg, "train", is_train=True)
    _, target = dataset[0]
    assert target["ga"].dense().max() > 1.05
    assert not list((tmp_path / "train" / "anomap_ws5_f0.5_ol0.1").iterdir())


def test_read_only_map_folder_shares_one_cache_across_workers(tmp_path, monkeypatch):
    """A read-only map folder: maps go to one shared cache folder, so a DataLoader worker computes an image's
    maps once and every other process (and the next run) reads them."""
    _overlap_set(tmp_path)
    maps = tmp_path / "train" / "anomap_ws5_f0.5_ol0.1"
    maps.mkdir(parents=True)
    import tempfile
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))  # workers fork: they see it too
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if Path(p) == maps else real_access(p, m, **k))
    cfg = load_config(None, [f"data.root={tmp_path}", "model.num_classes=1", "gamm.target_category_id=1",
                             "data.min_size_train=[48]", "data.hflip_prob=0.0"])
    with pytest.warns(UserWarning, match="cached in"):
        dataset = build_dataset(cfg, "train", is_train=True)
    cache = dataset.ga_store.write_dir
    assert cache != maps and str(cache).startswith(str(tmp_path / "tmp"))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=lambda b: b)
    first = next(iter(loader))[0][1]["ga"].dense()
    assert sorted(p.name for p in cache.iterdir()) == ["gamm_manifest.json", "image_1.npz"]  # written by the worker
    stamp = (cache / "image_1.npz").stat().st_mtime_ns
    again = build_dataset(cfg, "train", is_train=True)[0][1]["ga"].dense()  # a new process-level store
    assert torch.equal(first, again) and (cache / "image_1.npz").stat().st_mtime_ns == stamp  # read, not redone
    assert not list(maps.iterdir())


def test_manifest_refuses_other_parameters_and_redoes_changed_images(tmp_path):
    from gains.annotations import DataError

    _overlap_set(tmp_path)
    base = [f"data.root={tmp_path}", "model.num_classes=1", "gamm.target_category_id=1"]
    cfg = load_config(None, base)
    build_dataset(cfg, "train", is_train=True)[0]
    folder = tmp_path / "train" / "anomap_ws5_f0.5_ol0.1"
    manifest = json.loads((folder / "gamm_manifest.json").read_text())
    assert manifest["params"]["variant"] == "isbi" and list(manifest["images"]) == ["1"]
    # same folder name, other variant: refused, naming both
    with pytest.raises(DataError, match="variant=isbi.*but this run asks for.*variant=chrom"):
        build_dataset(load_config(None, base + ["gamm.variant=chrom"]), "train", is_train=True)
    # an edited annotation: that image's maps are stale and computed again
    stamp = (folder / "image_1.npz").stat().st_mtime_ns
    data = json.loads((tmp_path / "train.json").read_text())
    data["annotations"][0]["segmentation"] = [ellipse(22, 24, 10, 9)]
    (tmp_path / "train.json").write_text(json.dumps(data))
    dataset = build_dataset(cfg, "train", is_train=True)
    assert not (folder / "image_1.npz").exists()  # removed at build time
    dataset[0]
    assert (folder / "image_1.npz").stat().st_mtime_ns != stamp
    # with on-the-fly computation off, the stale image is named instead
    data["annotations"][0]["segmentation"] = [ellipse(21, 24, 10, 9)]
    (tmp_path / "train.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations of images \[1\] changed"):
        build_dataset(load_config(None, base + ["gamm.on_the_fly=false"]), "train", is_train=True)
    # preprocess.py --overwrite rebuilds the folder for new parameters
    assert preprocess.main(["--json", str(tmp_path / "train.json"), "--images", str(tmp_path / "train"),
                            "--variant", "chrom", "--window-size", "5", "--ga-factor", "0.5", "--overlap-hl",
                            "0.1", "--target-category", "1", "--overwrite"]) == 0
    assert json.loads((folder / "gamm_manifest.json").read_text())["params"]["variant"] == "chrom"
