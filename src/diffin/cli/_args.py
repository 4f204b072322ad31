"""Config dataclass → argparse options, and back.

Every field of a config dataclass (:class:`diffin.ScoreConfig`, :class:`diffin.bench.builtin.TrainConfig`,
the task configs, :class:`diffin.bench.BenchConfig`) becomes one option with the field's help text
(``metadata["help"]``) and choices (``metadata["choices"]``). Options the user does not give stay
``None`` in the namespace, so the dataclass (or a recorded recipe) supplies the default.

Flags: ``field_name`` → ``--field-name``. A bool field that defaults to False becomes a plain
switch ``--field-name``; one that defaults to True becomes ``--no-field-name``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

_CONVERTERS: dict[str, type] = {"int": int, "float": float, "str": str}


def flag_of(name: str) -> str:
    """The command-line spelling of a dataclass field or keyword: ``fd_eps`` → ``--fd-eps``."""
    return "--" + name.replace("_", "-")


def _base_type(f: dataclasses.Field) -> str:
    """``'int | None'`` → ``'int'`` (annotations are strings under ``from __future__ import annotations``)."""
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [p.strip() for p in typ.split("|") if p.strip() != "None"]
    if len(parts) != 1 or parts[0] not in (*_CONVERTERS, "bool"):
        raise TypeError(f"field {f.name} has type {typ!r}; the CLI supports int, float, str, bool (or X | None)")
    return parts[0]


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _with_default(help_: str, default: Any) -> str:
    """Help text with its default said once: not repeated when the text already names it, and not
    ``(default: None)`` (the text says what happens then)."""
    if default is None or "default" in help_.lower():
        return help_
    return f"{help_} (default: {default})"


def add_config_args(parser: argparse.ArgumentParser, cls: type, exclude: Sequence[str] = (),
                    title: str | None = None, show_defaults: bool = True) -> None:
    """Add one option per field of the dataclass ``cls`` (except ``exclude``) in its own group
    (``title``, default "<cls> options"). ``show_defaults=False`` when the dataclass defaults are
    not what applies (e.g. a recorded recipe fills the fields the user does not give)."""
    group = parser.add_argument_group(title or f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        typ = _base_type(f)
        default = _default_of(f)
        help_ = f.metadata.get("help", "")
        if typ == "bool":
            if default:
                name = f.name[3:] if f.name.startswith("no_") else f"no_{f.name}"
                group.add_argument(flag_of(name), dest=f.name, action="store_const", const=False, default=None,
                                   help=f"turn off what is on by default: {help_}")
            else:
                group.add_argument(flag_of(f.name), dest=f.name, action="store_const", const=True,
                                   default=None, help=help_)
            continue
        choices = f.metadata.get("choices")
        group.add_argument(flag_of(f.name), dest=f.name, type=_CONVERTERS[typ], default=None,
                           choices=choices,
                           help=_with_default(help_, default) if show_defaults else help_)


def given_fields(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` the user gave on the command line (name → value)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


def config_from_args(cls: type, args: argparse.Namespace, base: Any = None) -> Any:
    """``cls`` from the options the user gave, over ``base`` (or the dataclass defaults)."""
    given = given_fields(cls, args)
    return dataclasses.replace(base, **given) if base is not None else cls(**given)
