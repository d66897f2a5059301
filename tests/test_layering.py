"""The library's structure (gains/README.md, "Layout and the layer rule"): data flows one way through layers, each file in exactly one.

Layers, lowest first; a module may import modules of its own layer or of lower ones, never of a higher one,
and no gains module is imported inside a function (a local import hides a cycle instead of removing it).
The import graph has no cycle, and gains/ parses no command line (the CLIs are train.py, evaluate.py and
preprocess.py). Read from the source with `ast`, so nothing is imported to check it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

GAINS = Path(__file__).resolve().parent.parent / "gains"

LAYERS = {
    "utilities": ["errors", "atomic", "cli_errors", "config_rules", "config", "dist", "rng", "devices", "precision", "mask_runs",
                  "sparse_maps", "weights_io", "weight_names", "visualize"],
    "data": ["imageio", "annotations", "instances", "transforms", "gamm_windows", "gamm", "ga_store",
             "ga_manifest", "synthetic", "field_layout", "synthetic_field", "mask_polygons", "dataset_converters",
             "imagej_rois", "geojson_io", "instance_stacks", "instance_converters", "data", "sampling"],
    "metrics": ["average_precision", "aji", "cto", "cto_zone", "metrics"],
    "model": ["backbone", "rpn", "roi_align", "mask_head", "alrm", "roi_heads", "model", "checkpoint",
              "convert_checkpoint"],
    "inference": ["tiling", "predictor", "exports", "inference", "napari_layers"],
    "evaluation": ["scoring", "evaluation"],
    "training": ["optim", "train_log", "train_step", "engine"],
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}
LAYER_OF = {module: name for name, modules in LAYERS.items() for module in modules}


def gains_imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported gains module, inside a function?, line) for every import statement of a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level == 1 and module:  # from .x import y
                    found.append((module.split(".")[0], in_function, child.lineno))
                elif child.level == 1 or module == "gains":  # from . import x / from gains import x
                    found.extend((alias.name, in_function, child.lineno) for alias in child.names)
                elif module.startswith("gains."):
                    found.append((module.split(".")[1], in_function, child.lineno))
            elif isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[1], in_function, child.lineno) for alias in child.names
                             if alias.name.startswith("gains."))
            visit(child, local)

    visit(tree, False)
    return found


MODULES = sorted(p.stem for p in GAINS.glob("*.py") if p.stem != "__init__")


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if m not in RANK]
    stale = [m for m in RANK if m not in MODULES]
    assert not unplaced, f"place the new module(s) {unplaced} in a layer of tests/test_layering.py and gains/README.md"
    assert not stale, f"{stale} are listed in LAYERS but no longer exist"


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_down_the_layers_and_sit_at_the_top(module):
    for target, in_function, line in gains_imports(GAINS / f"{module}.py"):
        where = f"gains/{module}.py:{line} imports gains.{target}"
        assert not in_function, f"{where} inside a function; import it at the top of the file"
        assert RANK[target] <= RANK[module], (f"{where}: layer {LAYER_OF[module]!r} may not depend on the higher "
                                              f"layer {LAYER_OF[target]!r}")


def test_the_import_graph_has_no_cycle():
    graph = {m: sorted({t for t, _, _ in gains_imports(GAINS / f"{m}.py") if t != m}) for m in MODULES}
    state: dict[str, str] = {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                walk(nxt, path + [node])
        state[node] = "done"

    for m in MODULES:
        if m not in state:
            walk(m, [])


def test_the_library_parses_no_command_line():
    for module in MODULES:
        source = (GAINS / f"{module}.py").read_text()
        assert "import argparse" not in source and '__name__ == "__main__"' not in source, (
            f"gains/{module}.py parses a command line: CLIs live in train.py, evaluate.py, preprocess.py")


def test_the_checker_sees_a_violation(tmp_path):
    """The checks above can fail: a function-level import and an upward import are both found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from .engine import train\n\ndef f():\n    from gains.model import build_model\n")
    assert gains_imports(bad) == [("engine", False, 1), ("model", True, 4)]
