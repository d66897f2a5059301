"""Fuzz (issue 11): random mutations of a valid COCO json end in success or one of our own errors.

Seeded and bounded: CASES mutated copies of a small data set (polygons, compressed and uncompressed RLE, a
crowd annotation, two categories), each with 1-3 mutations drawn from: delete a key, wrong types, NaN / inf /
huge numbers, empty lists and dicts, duplicate ids, strings where numbers go, nested garbage. Every case runs
load_coco and then, for the images that survive, builds the training item (image, masks, boxes) and computes
its GA maps through the data set, in process, under a per-case time limit. Anything but success or
DataError / ConfigError / CheckpointError / EvaluationError fails the test with the mutations that caused it.
(The crash class — a process killed by a signal — is covered by the subprocess test in test_bad_inputs.py.)
"""
from __future__ import annotations

import copy
import json
import random
import signal
import warnings
from collections import Counter

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import ellipse, square, uncompressed_rle, write_png
from gains.checkpoint import CheckpointError
from gains.annotations import DataError, load_coco
from gains.config import ConfigError
from gains.data import InstanceDataset
from gains.evaluation import EvaluationError
from gains.ga_store import GAMapStore, GammParams
from gains.transforms import EvalTransform

OURS = (DataError, ConfigError, CheckpointError, EvaluationError)
CASES = 300
SECONDS_PER_CASE = 5
H, W = 40, 48


def _base() -> dict:
    m = np.zeros((H, W), np.uint8, order="F")
    m[20:30, 5:15] = 1
    rle = mask_utils.encode(m)
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                   {"id": 2, "file_name": "b.png", "height": H, "width": W}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [square(4, 4, 14)], "iscrowd": 0,
             "area": 196.0, "bbox": [4, 4, 14, 14]},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [ellipse(24, 14, 9, 6)], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 2,
             "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 1, "segmentation": uncompressed_rle(m), "iscrowd": 1},
            {"id": 5, "image_id": 2, "category_id": 2, "segmentation": [square(30, 5, 8), square(30, 25, 6)],
             "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "cell"}, {"id": 2, "name": "nucleus"}],
    }


GARBAGE = [None, "abc", "", -1, 0, 1, 2.5, 1e308, -1e308, 2 ** 70, float("nan"), float("inf"), -float("inf"),
           True, [], {}, [[["deep"]]], {"a": {"b": [1, "x"]}}, [1, 2, 3], "12", [float("nan")] * 6]


def _paths(tree, path=()):
    """Every (path to a container, key) in the json tree."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return
    for k, v in items:
        yield path, k
        yield from _paths(v, path + (k,))


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _mutate(data: dict, rng: random.Random) -> list[str]:
    """Apply 1-3 random mutations in place; returns their descriptions."""
    done = []
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(data))
        if not paths:
            break
        shallow = [p for p in paths if len(p[0]) <= 2]  # ids, sizes, whole segmentations: not only coordinates
        path, key = rng.choice(shallow if rng.random() < 0.6 else paths)
        parent = _get(data, path)
        where = "/".join(map(str, path + (key,)))
        op = rng.choice(["delete", "garbage", "garbage", "number", "empty", "duplicate", "string", "nest"])
        value = parent[key]
        if op == "delete":
            del parent[key]
        elif op == "garbage":
            parent[key] = copy.deepcopy(rng.choice(GARBAGE))
        elif op == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[key] = rng.choice([value * 1e6, -value, value + 0.5, float("nan"), float("inf"), 10 ** 20])
        elif op == "empty":
            parent[key] = rng.choice([[], {}, ""])
        elif op == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(value))  # e.g. a duplicated image or annotation (same id)
        elif op == "string":
            parent[key] = str(value)
        elif op == "nest":
            parent[key] = [value, {"x": value}]
        else:
            parent[key] = None
            op = "null"
        done.append(f"{op} {where}")
    return done


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _run_case(tmp_path, n: int, data: dict) -> str:
    json_path = tmp_path / f"case{n}.json"
    json_path.write_text(json.dumps(data))  # NaN / Infinity are written as the JSON extensions Python reads
    records, cmap, _ = load_coco(json_path, tmp_path / "train")
    params = GammParams("isbi", 3, 0.5, 0.1, 1)
    store = GAMapStore(tmp_path / f"maps{n}", params, on_the_fly=True)
    dataset = InstanceDataset(records, cmap, EvalTransform(48, 64), ga_store=store)
    for i in range(len(dataset)):
        image, target = dataset[i]
        assert image.shape[0] == 3 and len(target["labels"]) == len(target["ann_ids"])
    return "ok"


def test_random_mutations_end_in_success_or_our_errors(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        write_png(tmp_path / "train" / name, rng.integers(0, 255, (H, W), dtype=np.uint8))
    base = _base()
    assert _run_case(tmp_path, -1, base) == "ok"  # the unmutated data set loads and trains
    outcomes, failures = Counter(), []
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for n in range(CASES):
            data = copy.deepcopy(base)
            what = _mutate(data, random.Random(n))
            signal.alarm(SECONDS_PER_CASE)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # counted drop warnings are a success
                    outcomes[_run_case(tmp_path, n, data)] += 1
            except OURS as e:
                outcomes[type(e).__name__] += 1
                assert "\n" not in str(e), f"case {n} {what}: multi-line message {e}"
            except _Timeout:
                failures.append(f"case {n} {what}: no result within {SECONDS_PER_CASE} s")
            except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
                failures.append(f"case {n} {what}: {type(e).__name__}: {e}")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"fuzz: {CASES} cases -> {dict(outcomes)}")
    assert not failures, "\n".join(failures)
    assert outcomes["ok"] > 0 and outcomes["DataError"] > 0  # the mutations reach both outcomes
