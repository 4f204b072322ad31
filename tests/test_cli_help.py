"""The command line's shape: help texts, flags built from the config dataclasses, --version,
library hints said as flags, and the layering (no library module imports the CLI)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest

import diffin
from diffin._version import __version__
from diffin.cli import build_parser, main
from diffin.cli._args import add_config_args, config_from_args, given_fields
from diffin.cli._messages import flag_table, in_cli_terms
from diffin.config import config_field

SRC = Path(diffin.__file__).resolve().parent


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


COMMANDS = sorted(_subparsers(build_parser()))


def _field_help(name: str) -> str | None:
    """The help text of the config field ``name`` (of any config dataclass of the CLI)."""
    from diffin.bench import BenchConfig
    from diffin.bench.builtin.trainer import TrainConfig
    from diffin.config import ScoreConfig
    from diffin.tasks import CleanConfig, DebiasConfig, DeleteConfig, PruneConfig

    for cls in (ScoreConfig, TrainConfig, CleanConfig, DeleteConfig, PruneConfig, DebiasConfig, BenchConfig):
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.metadata["help"]
    return None


def test_every_command_is_there():
    assert set(COMMANDS) == {"methods", "train", "score", "verify", "demo", "clean", "delete", "prune", "debias",
                             "bench", "embed"}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_says_each_default_once_and_flags_read_well(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: diffin {command}" in text
    assert "--no-no-" not in text
    assert "(default: None)" not in text
    flat = " ".join(text.split())
    assert re.search(r"\(default: [^)]*\) \(default:", flat) is None  # the old "(default: 1) (default: None)"
    for action in _subparsers(build_parser())[command]._actions:
        help_ = action.help or ""
        if help_.count("default") > 1:  # the CLI adds a default only where the text names none
            assert help_ == _field_help(action.dest), (command, action.option_strings)


def test_score_help_lists_the_score_config(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    out = capsys.readouterr().out
    for flag in ("--hvp", "--convention", "--fd-eps", "--first-order", "--pairwise", "--model", "--data"):
        assert flag in out
    assert "finite" in out
    assert "--no-pairwise" not in out  # off by default: a plain switch


def test_clean_has_a_plain_no_validation_switch():
    args = build_parser().parse_args(["clean", "--setup", "tiny", "--out", "x", "--no-validation"])
    assert args.no_validation is True
    args = build_parser().parse_args(["clean", "--setup", "tiny", "--out", "x"])
    assert args.no_validation is None  # not given: the dataclass default applies


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffin {__version__}"


@dataclasses.dataclass
class _Options:
    fast: bool = config_field(False, "go fast")
    color: bool = config_field(True, "colour the output")
    no_cache: bool = config_field(True, "skip the cache")
    steps: int = config_field(3, "number of steps (default: three)")
    rate: float | None = config_field(None, "learning rate; default: chosen from the data")
    mode: str = config_field("a", "the mode", choices=("a", "b"))


def _options_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t")
    add_config_args(p, _Options)
    return p


def test_bool_flags_from_their_defaults():
    p = _options_parser()
    flags = {o for a in p._actions for o in a.option_strings}
    assert {"--fast", "--no-color", "--cache", "--steps", "--rate", "--mode"} <= flags
    assert not {"--no-fast", "--color", "--no-no-cache"} & flags
    args = p.parse_args(["--fast", "--no-color", "--cache"])
    assert config_from_args(_Options, args) == _Options(fast=True, color=False, no_cache=False)
    assert given_fields(_Options, p.parse_args([])) == {}
    assert config_from_args(_Options, p.parse_args([])) == _Options()


def test_values_are_typed_and_checked(capsys):
    p = _options_parser()
    args = p.parse_args(["--steps", "7", "--rate", "0.5", "--mode", "b"])
    assert given_fields(_Options, args) == {"steps": 7, "rate": 0.5, "mode": "b"}
    base = _Options(steps=1, fast=True)
    assert config_from_args(_Options, p.parse_args(["--mode", "b"]), base=base) == _Options(
        steps=1, fast=True, mode="b")
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])
    assert "invalid choice" in capsys.readouterr().err


def test_defaults_in_help_once():
    helps = {a.dest: a.help for a in _options_parser()._actions}
    assert helps["steps"] == "number of steps (default: three)"  # the text already says it
    assert helps["rate"] == "learning rate; default: chosen from the data"
    assert helps["mode"] == "the mode (default: a)"


def test_library_hints_in_cli_terms():
    table = flag_table(_subparsers(build_parser())["score"])
    say = lambda m: in_cli_terms(m, table)  # noqa: E731
    assert say("out holds scores; pass overwrite=True (--overwrite) or choose another folder") == (
        "out holds scores; pass --overwrite or choose another folder")
    assert say("pass overwrite=True (on the command line: --overwrite) to replace them") == (
        "pass --overwrite to replace them")
    assert say("choose another folder or pass overwrite=True to replace it") == (
        "choose another folder or pass --overwrite to replace it")
    assert say("try fd_eps=1e-4 or hvp='exact'") == "try --fd-eps 1e-4 or --hvp exact"
    assert say("pass pairwise=True, or method=tracin") == "pass --pairwise, or --method tracin"
    # not options of the command: left as they are
    assert say("use reduction='none' in your loss") == "use reduction='none' in your loss"
    assert say("resume=True continues the run") == "--resume continues the run"
    assert say("strict=True stops early") == "strict=True stops early"
    table = flag_table(_options_parser())
    assert in_cli_terms("set color=False or no_cache=False", table) == "set --no-color or --cache"


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of every module ``path`` (a file of the diffin package) imports."""
    package = list(path.relative_to(SRC.parent).parts[:-1])  # the package the file is in
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return names


def test_library_never_imports_the_cli():
    """Arrows run down only: argparse and diffin.cli are imported by diffin/cli/ (and
    ``python -m diffin``) alone."""
    offenders = [
        f"{path.relative_to(SRC)}: {name}"
        for path in sorted(SRC.rglob("*.py"))
        if (SRC / "cli") not in path.parents and path.name != "__main__.py"
        for name in _imported_modules(path)
        if name == "argparse" or name == "diffin.cli" or name.startswith("diffin.cli.")
    ]
    assert offenders == []
    assert "diffin.cli" in _imported_modules(SRC / "__main__.py")  # the resolver sees relative imports


def test_error_text_names_the_overwrite_flag():
    from diffin._errors import ConfigError, OutputExistsError
    from diffin.cli._messages import error_text

    parsers = _subparsers(build_parser())
    prune, bench = flag_table(parsers["prune"]), flag_table(parsers["bench"])
    e = OutputExistsError("out holds prune results made from other inputs; choose another folder or overwrite them")
    assert error_text(e, prune) == ("OutputExistsError: out holds prune results made from other inputs; choose "
                                    "another folder or overwrite them; pass --overwrite to replace them")
    assert error_text(e, bench).endswith("or overwrite them")  # bench has no --overwrite
    e = OutputExistsError("out holds scores; pass overwrite=True or choose another folder")
    assert error_text(e, prune) == "OutputExistsError: out holds scores; pass --overwrite or choose another folder"
    assert error_text(ConfigError("give lr=0.1"), prune) == "ConfigError: give --lr 0.1"
