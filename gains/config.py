"""YAML configs: `_base_` inheritance, dotted `key=value` overrides, unknown keys are errors.

Every key a run may use is declared, with a one-line comment, in `configs/base.yaml`. A dataset config names
its parent with `_base_: base.yaml` (relative to its own folder) and overrides a few lines. Overrides from the
command line use dotted paths (`solver.base_lr=0.01`); their values are parsed as YAML (`[640, 800]`, `null`,
`true`). A key that base.yaml does not declare is rejected with its full dotted name, so a typo never trains
silently with a default.

Values are type-checked against base.yaml, in config files and overrides alike: a key takes the type of its
base.yaml default (int; float, ints accepted; bool; str, numbers accepted as text; list, with the element
type of the default when it is homogeneous). Keys that take more than one form, or whose default is null,
declare their forms in `TYPES` below. A wrong type is one ConfigError line naming the key, the value and the
expected type, e.g. `command-line override: solver.max_iter='abc' is not an integer (e.g. 20000)`. Then the
values: allowed choices, ranges and cross-key rules (gains/config_rules.py), again one line each.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

import yaml

from .atomic import write_text_atomic
from .config_rules import check_rules
from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"


# Accepted forms of the keys whose base.yaml default is null or that take more than one form, separated by
# " | ": null, int, float (ints accepted), bool, str, list[T] (elements of type T), list[T, n] (exactly n).
# Every base.yaml key with a null default must be listed here (tests/test_bad_inputs.py checks it).
TYPES = {
    "init_weights": "str | null",                       # path of a whole-model .pth
    "data.min_size_train": "int | list[int]",           # one size or the multi-scale choices
    "data.intensity_scale": "list[float, 2] | null",    # [lo, hi]
    "data.crop_size": "int | list[int, 2] | null",      # S or [h, w]
    "gamm.map_dir": "str | null",                       # folder
    "model.backbone.weights": "str | null",             # path of ImageNet weights
    "model.rpn.anchor_sizes": "list[float]",            # anchor sides in px may be fractional (2^(1/3) scales)
    "model.roi_heads.mask_loss_weight": "float | null",
    "solver.amp": "bool | int | str",                   # false / true (0 / 1) / bf16 / fp16 (precision.parse_amp)
    "test.detections_per_tile": "int | null",
    "test.max_dets_eval": "int | null",                 # null = no cap (scoring.check_max_dets: >= 10)
    "test.tile_scale": "float | str",                   # a resize factor or 'auto' (predictor.tile_scale_from_config)
}

_FORM = re.compile(r"^(null|int|float|bool|str)$|^list\[(int|float|bool|str)(?:,\s*(\d+))?\]$")
_NAMES = {"null": "null", "int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}
_PLURAL = {"int": "integers", "float": "finite numbers", "bool": "booleans", "str": "strings"}


def _scalar_kind(value: Any) -> str | None:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return None


def _forms_of(dotted: str, default: Any) -> list[tuple]:
    """[(kind, element kind or None, length or None)] accepted for a key, from TYPES or its default."""
    if dotted in TYPES:
        out = []
        for form in TYPES[dotted].split("|"):
            m = _FORM.match(form.strip())
            if not m:
                raise ConfigError(f"gains/config.py TYPES[{dotted!r}] has the unknown form {form.strip()!r}")
            out.append(("list", m.group(2), int(m.group(3)) if m.group(3) else None) if m.group(2)
                       else (m.group(1), None, None))
        return out
    if default is None:
        raise ConfigError(f"{BASE_CONFIG.name} declares {dotted}: null without an expected type; add it to "
                          "TYPES in gains/config.py")
    if isinstance(default, list):
        kinds = {_scalar_kind(v) for v in default}
        if kinds == {"int", "float"}:
            kinds = {"float"}
        return [("list", kinds.pop() if len(kinds) == 1 and None not in kinds else None, None)]
    return [(_scalar_kind(default), None, None)]


def _describe(forms: list[tuple]) -> str:
    parts = []
    for kind, elem, n in forms:
        if kind != "list":
            parts.append(_NAMES.get(kind, kind))
        else:
            what = _PLURAL[elem] if elem else "values"
            parts.append(f"a list of {n} {what}" if n is not None else f"a list of {what}")
    return " or ".join(parts)


def _fits(value: Any, kind: str) -> tuple[bool, Any]:
    """(does `value` fit the scalar `kind`, the value to store)."""
    actual = _scalar_kind(value)
    if kind == "float":
        finite = actual == "float" and math.isfinite(value) or actual == "int" and abs(value) < 1e300
        return finite, value
    if kind == "str" and actual in ("int", "float"):  # `output_dir=2024`: YAML made it a number
        return True, str(value)
    return actual == kind, value


def check_value(dotted: str, value: Any, default: Any, source: str) -> Any:
    """`value` (possibly a number turned into text for a str key) if it has the type base.yaml declares for
    `dotted` (module docstring, TYPES); else ConfigError naming the key, the value and the expected type."""
    forms = _forms_of(dotted, default)
    for kind, elem, n in forms:
        if kind != "list":
            ok, stored = _fits(value, kind)
            if ok:
                return stored
        elif isinstance(value, list) and (n is None or len(value) == n):
            if elem is None:
                return value
            fitted = [_fits(v, elem) for v in value]
            if all(ok for ok, _ in fitted):
                return [v for _, v in fitted]
    example = "" if default is None else f" (e.g. {yaml.safe_dump(default, default_flow_style=True).strip()})"
    example = example.replace("\n...", "")
    raise ConfigError(f"{source}: {dotted}={value!r} is not {_describe(forms)}{example}")


class Config(dict):
    """A nested dict whose keys are also attributes (`cfg.solver.base_lr`).

    Plain dict underneath, so it pickles, deep-copies and dumps to YAML like one.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}


def _wrap(tree: Any) -> Any:
    if isinstance(tree, dict):
        return Config({k: _wrap(v) for k, v in tree.items()})
    return tree


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _load_chain(path: Path, seen: tuple = ()) -> dict:
    """Load `path` merged over its `_base_` chain (base first), without key validation."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `_base_` cycle through {[str(p) for p in seen]}")
    data = _read_yaml(path)
    base_name = data.pop("_base_", None)
    if base_name is None:
        return data
    base = _load_chain((path.parent / base_name), seen + (path,))
    _merge_into(base, data, source=str(path), schema=None)
    return base


# Keys that moved: old dotted name -> new one. Configs and checkpoints written before still load (one warning).
MOVED_KEYS = {"model.alrm.mask_loss_weight": "model.roi_heads.mask_loss_weight"}


def _move_renamed_keys(tree: dict, source: str) -> dict:
    """Rewrite the MOVED_KEYS of a nested config dict (file or overrides) to their new names, in place."""
    for old, new in MOVED_KEYS.items():
        *parents, leaf = old.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        warnings.warn(f"{source}: config key {old} is now {new}; its value {value!r} was used for {new} "
                      f"(rename it in the file to silence this)", FutureWarning, stacklevel=3)
        target = tree
        *new_parents, new_leaf = new.split(".")
        for part in new_parents:
            target = target.setdefault(part, {})
        target[new_leaf] = value
    return tree


def _merge_into(dst: dict, src: dict, source: str, schema: dict | None, prefix: str = "") -> None:
    """Recursively copy `src` into `dst`. With a `schema`, every key must exist there."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if schema is not None and key not in schema:
            hint = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1)
            raise ConfigError(
                f"{source}: unknown config key {dotted!r}"
                + (f" (did you mean {prefix + hint[0]!r}?)" if hint else "")
                + f"; every key must be declared in {BASE_CONFIG.relative_to(CONFIG_DIR.parent)}"
            )
        sub_schema = schema.get(key) if schema is not None else None
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge_into(dst[key], value, source, sub_schema if isinstance(sub_schema, dict) else None,
                        prefix=dotted + ".")
        elif schema is not None and isinstance(sub_schema, dict) and not isinstance(value, dict):
            raise ConfigError(f"{source}: {dotted!r} is a section ({', '.join(sub_schema)}); "
                              f"set its keys, e.g. {dotted}.{next(iter(sub_schema))}=...")
        elif schema is not None:
            dst[key] = copy.deepcopy(check_value(dotted, value, sub_schema, source))
        else:
            dst[key] = copy.deepcopy(value)


def parse_overrides(overrides: Iterable[str]) -> dict:
    """`["solver.base_lr=0.01", "model.mode=mask_rcnn"]` -> nested dict with YAML-parsed values."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. solver.base_lr=0.01")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> Config:
    """Resolve a config file (or base.yaml when `path` is None) plus `key=value` overrides.

    Returns a `Config`; raises `ConfigError` naming the offending key and file.
    """
    overrides = list(overrides)
    schema = _read_yaml(BASE_CONFIG)
    schema.pop("_base_", None)
    cfg = copy.deepcopy(schema)
    if path is not None:
        _merge_into(cfg, _move_renamed_keys(_load_chain(Path(path)), str(path)), source=str(path), schema=schema)
    _merge_into(cfg, _move_renamed_keys(parse_overrides(overrides), "command-line override"),
                source="command-line override", schema=schema)
    try:
        check_rules(cfg)  # allowed values and ranges (gains/config_rules.py), after the types
    except ConfigError as e:
        where = str(path) if path is not None else BASE_CONFIG.name
        raise ConfigError(f"{where}{' + overrides' if overrides else ''}: {e}") from None
    return _wrap(cfg)


def dump_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (tmp file + rename)."""
    data = cfg.to_dict() if isinstance(cfg, Config) else cfg
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
