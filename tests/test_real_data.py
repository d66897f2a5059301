"""The real-data configs load their data, with GA maps, without writing into data folders that are not ours.
Each test skips, saying why, when its data is absent (DeepFISH lives outside the repository; the DSB2018
sample needs the stardist wheel)."""
import importlib.util
from pathlib import Path

import pytest

from gains.config import load_config
from gains.data import build_dataset

ROOT = Path(__file__).resolve().parent.parent
DEEPFISH = (ROOT / load_config(ROOT / "configs/deepfish.yaml").data.root).resolve()


@pytest.mark.skipif(not (DEEPFISH / "train.json").is_file(), reason=f"DeepFISH data not found at {DEEPFISH}")
def test_deepfish_config_trains_from_a_read_only_data_folder(tmp_path):
    maps = tmp_path / "anomap_ws5_f0.5_ol0.3"
    cfg = load_config(ROOT / "configs/deepfish.yaml", [f"data.root={DEEPFISH}", f"gamm.map_dir={maps}"])
    dataset = build_dataset(cfg, "train", is_train=True)
    image, target = dataset[0]
    assert len(dataset) == 34 and target["labels"].tolist() == [1, 1]
    assert target["ga"].shape == target["masks"].shape and float(target["ga"].dense().max()) <= 1.5 + 1e-6
    assert len(list(maps.glob("image_*.npz"))) == 1  # one compact file per image
    assert not list((DEEPFISH / "images").glob("anomap_*"))  # nothing written next to the shared images
    assert len(build_dataset(cfg, "test", is_train=False)) == 12


@pytest.mark.skipif(importlib.util.find_spec("stardist") is None,
                    reason="stardist wheel not installed (pip install --no-deps stardist==0.9.2)")
def test_dsb2018_config_loads_the_converted_sample(tmp_path):
    from gains.dataset_converters import convert_dsb2018_sample
    convert_dsb2018_sample(tmp_path / "dsb2018")
    cfg = load_config(ROOT / "configs/dsb2018_sample.yaml", [f"data.root={tmp_path / 'dsb2018'}"])
    dataset = build_dataset(cfg, "train", is_train=True)
    image, target = dataset[0]
    assert len(dataset) == 10 and image.shape[-2:] == target["ga"].shape[-2:]
    assert float(target["ga"].dense().max()) > 1.0  # touching nuclei are marked (nuclei variant, GA up to 1.8)
    assert len(build_dataset(cfg, "test", is_train=False)) == 3
