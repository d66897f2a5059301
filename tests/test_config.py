from pathlib import Path

import pytest
import yaml

from gains.config import CONFIG_DIR, ConfigError, dump_config, load_config, parse_overrides


def test_base_loads_with_attribute_access():
    cfg = load_config()
    assert cfg.solver.base_lr == 0.015
    assert cfg.model.backbone.depth == 50
    assert cfg["model"]["roi_heads"]["box_weights"] == [10.0, 10.0, 5.0, 5.0]


def test_every_base_key_has_a_comment():
    for n, line in enumerate((CONFIG_DIR / "base.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, _, value = stripped.partition(":")
        if value.strip():  # a leaf: `key: value  # comment`
            assert "#" in value, f"base.yaml line {n} ({key}) has no one-line comment"


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "parent.yaml").write_text(f"_base_: {CONFIG_DIR / 'base.yaml'}\nsolver:\n  base_lr: 0.02\n")
    (tmp_path / "child.yaml").write_text("_base_: parent.yaml\nmodel:\n  backbone:\n    depth: 18\n")
    cfg = load_config(tmp_path / "child.yaml", ["solver.max_iter=7", "data.min_size_train=[64, 96]",
                                                "model.backbone.weights=null"])
    assert cfg.solver.base_lr == 0.02           # from the parent
    assert cfg.model.backbone.depth == 18       # from the child
    assert cfg.model.backbone.norm == "frozen_bn"  # untouched default
    assert cfg.solver.max_iter == 7 and cfg.data.min_size_train == [64, 96]
    assert cfg.model.backbone.weights is None


def test_unknown_key_in_file_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("_base_: " + str(CONFIG_DIR / "base.yaml") + "\nsolver:\n  base_lrr: 1\n")
    with pytest.raises(ConfigError, match=r"solver\.base_lrr.*did you mean 'solver\.base_lr'"):
        load_config(tmp_path / "bad.yaml")


def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match=r"model\.backbone\.deepth"):
        load_config(None, ["model.backbone.deepth=18"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["solver.base_lr"])


def test_section_cannot_be_replaced_by_scalar():
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["solver=3"])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_parse_overrides_types():
    tree = parse_overrides(["a.b=1", "a.c=true", "d=[1, 2]", "e=hello", "f=null"])
    assert tree == {"a": {"b": 1, "c": True}, "d": [1, 2], "e": "hello", "f": None}


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["seed=3"])
    dump_config(cfg, tmp_path / "out" / "config.yaml")
    again = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert again == cfg.to_dict()
    # the dumped file is itself a loadable config
    assert load_config(tmp_path / "out" / "config.yaml").seed == 3


@pytest.mark.parametrize("path", sorted(Path(CONFIG_DIR).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_moved_key_still_loads_with_a_warning(tmp_path):
    """model.alrm.mask_loss_weight moved to model.roi_heads.mask_loss_weight: old files, overrides and the
    configs saved in old checkpoints keep working, each with one FutureWarning naming both keys."""
    old = tmp_path / "old.yaml"
    old.write_text("_base_: " + str(CONFIG_DIR / "base.yaml") + "\nmodel:\n  alrm:\n    mask_loss_weight: 0.5\n")
    with pytest.warns(FutureWarning, match=r"model\.alrm\.mask_loss_weight is now model\.roi_heads\.mask_loss_weight"):
        cfg = load_config(old)
    assert cfg.model.roi_heads.mask_loss_weight == 0.5 and "mask_loss_weight" not in cfg.model.alrm
    with pytest.warns(FutureWarning, match="command-line override"):
        cfg = load_config(None, ["model.alrm.mask_loss_weight=2.0"])
    assert cfg.model.roi_heads.mask_loss_weight == 2.0
    saved = load_config(None).to_dict()  # a checkpoint's config written before the move
    saved["model"]["alrm"]["mask_loss_weight"] = saved["model"]["roi_heads"].pop("mask_loss_weight")
    saved["model"]["alrm"]["mask_loss_weight"] = 0.25
    dump_config(saved, tmp_path / "saved.yaml")
    with pytest.warns(FutureWarning):
        assert load_config(tmp_path / "saved.yaml").model.roi_heads.mask_loss_weight == 0.25


PAPER_CONFIGS = [f"{d}_r{depth}.yaml" for d in ("isbi", "ucoc", "kaggle") for depth in (50, 101)]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_cannot_train_frozen_bn_on_a_random_resnet(name):
    """As shipped (frozen BN, weights null) a paper config is refused before training, naming both fixes;
    each fix, or the explicit allowance, lets it through."""
    from gains.model import check_backbone_init

    path = CONFIG_DIR / name
    cfg = load_config(path)
    assert (cfg.model.backbone.norm, cfg.model.backbone.weights) == ("frozen_bn", None)
    with pytest.raises(ConfigError) as e:
        check_backbone_init(cfg)
    depth = cfg.model.backbone.depth
    assert f"model.backbone.weights=weights/R-{depth}.pkl" in str(e.value) and "\n" not in str(e.value)
    assert "model.backbone.norm=gn model.backbone.freeze_at=0" in str(e.value)
    for fix in ([f"model.backbone.weights=weights/R-{depth}.pkl"], ["init_weights=model_final.pth"],
                ["model.backbone.norm=gn", "model.backbone.freeze_at=0"],
                ["model.backbone.allow_frozen_bn_from_scratch=true"]):
        check_backbone_init(load_config(path, fix))
