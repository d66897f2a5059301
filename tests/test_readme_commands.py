"""Every `python ...` / `torchrun ...` command in the repository's READMEs parses and, for train.py and
evaluate.py, loads and validates its config as written (a dry run: nothing trains, no data is read), so a
README command cannot rot.

README conventions this relies on: commands sit in ```bash blocks, one per line (a trailing backslash
continues it), `# ...` starts a comment, `[...]` marks optional arguments (checked both without them and,
when they parse as arguments, with them), `a|b` lists alternatives (the first is checked), and upper-case
words are placeholders: for paths (CONFIG, RUN/..., IMAGES_DIR), which a dry run never opens, or, one
letter alone (N, K), for numbers.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gains.config import load_config
from gains.engine import check_batch_size, check_solver
from gains.model import check_backbone_init
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
READMES = sorted(p for p in [ROOT / "README.md", *ROOT.glob("*/README.md")] if p.is_file())
SCRIPTS = ("train.py", "evaluate.py", "preprocess.py")


def readme_commands() -> list[tuple[str, int, str]]:
    """(README path relative to the repository, line number, command) of every python/torchrun line in a
    ```bash block (continuations joined, comments removed)."""
    out = []
    for path in READMES:
        in_block, pending, start = False, "", 0
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_block = line.strip() in ("```bash", "```sh", "```shell") and not in_block
                continue
            if not in_block:
                continue
            text = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
            if pending:
                pending += " " + text.strip().rstrip("\\").strip()
            elif re.match(r"^\s*(python|torchrun)\s", text):
                pending, start = text.strip().rstrip("\\").strip(), n
            if pending and not text.endswith("\\"):
                out.append((str(path.relative_to(ROOT)), start, pending))
                pending = ""
    return out


def _variants(command: str) -> list[str]:
    """The command without its optional [...] parts, and with them (brackets removed); `a|b` -> a."""
    bare = re.sub(r"(?<=\s)\[[^\]]*\]", "", command)  # '[' after a space: optional; key=[1,2] is a value
    full = re.sub(r"(?<=\s)\[([^\]]*)\]", r"\1", command)
    # a|b -> a; a lone capital letter (N, K) is a number placeholder -> 1
    pick = lambda c: re.sub(r"(?<=\s)[A-Z](?=\s|$)", "1", re.sub(r"(\S+?)\|\S+", r"\1", c))  # noqa: E731
    return list(dict.fromkeys([pick(bare), pick(full)]))


def _split_launcher(argv: list[str]) -> tuple[int, list[str]]:
    """(number of processes, argv from the script on) of `python [-m x] script ...` or `torchrun ... script`."""
    if argv[0] == "python":
        return 1, argv[1:]
    nproc, rest = 1, argv[1:]
    while rest and rest[0].startswith("--"):
        opt = rest.pop(0)
        if opt.startswith("--nproc_per_node"):
            nproc = int(opt.split("=", 1)[1]) if "=" in opt else int(rest.pop(0))
    return nproc, rest


COMMANDS = readme_commands()


def test_the_readmes_have_commands():
    assert len(COMMANDS) >= 15, COMMANDS  # the extractor finds them (guards the guard)
    assert any(c.startswith("torchrun") for _, _, c in COMMANDS)


@pytest.mark.parametrize("where,line,command", COMMANDS, ids=[f"{w}:{n}" for w, n, _ in COMMANDS])
def test_readme_command_parses_and_its_config_validates(where, line, command):
    for variant in _variants(command):
        argv = shlex.split(variant)
        nproc, argv = _split_launcher(argv)
        if argv[0] == "-m":  # python -m pytest ...
            assert argv[1] in ("pytest",), f"{where}:{line}: unknown module in {command!r}"
            continue
        script = argv[0]
        assert (ROOT / script).is_file(), f"{where}:{line}: {script} does not exist ({command!r})"
        if Path(script).name not in SCRIPTS:
            continue  # benchmarks: the file exists; their own tests run them
        module = load_script(Path(script).stem)
        try:
            args = module.parse_args(argv[1:])
        except SystemExit as e:
            pytest.fail(f"{where}:{line}: {variant!r} does not parse (exit {e.code})")
        config = getattr(args, "config", None)
        if Path(script).name == "train.py" or (Path(script).name == "evaluate.py" and config):
            cfg = load_config(str(ROOT / config) if config else None, args.overrides)
            if Path(script).name == "train.py":
                check_solver(cfg.solver)
                check_batch_size(int(cfg.solver.ims_per_batch), nproc)
                check_backbone_init(cfg)


def test_a_rotten_command_is_caught():
    """The checks above fail on the kinds of rot they are for: an unknown key, an unknown option, a batch
    that does not split over the processes, a paper config trained without its ImageNet weights."""
    module = load_script("train")
    with pytest.raises(SystemExit):
        load_script("evaluate").parse_args(["--ckpt", "x.pth", "--no-such-option"])
    args = module.parse_args(["configs/quickstart.yaml", "solver.no_such_key=1"])
    with pytest.raises(Exception, match="no_such_key"):
        load_config(str(ROOT / args.config), args.overrides)
    cfg = load_config(str(ROOT / "configs/quickstart.yaml"))
    with pytest.raises(Exception, match="multiple"):
        check_batch_size(int(cfg.solver.ims_per_batch), 3)
    with pytest.raises(Exception, match="model.backbone.weights=null"):  # a paper config without weights
        check_backbone_init(load_config(str(ROOT / "configs/isbi_r50.yaml")))
