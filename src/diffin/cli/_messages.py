"""Library messages in command-line terms.

The library's errors speak Python (``pass overwrite=True``); on the command line the same hint
must name the flag (``pass --overwrite``). :func:`in_cli_terms` rewrites every ``name=value``
whose ``name`` is an option of the command being run, using the command's own parser, so the
translation follows the flags exactly (``resume=True`` → ``--resume``, a bool field on by default
``x=False`` → ``--no-x``, ``fd_eps=1e-4`` → ``--fd-eps 1e-4``). Anything that is not an option of
the command is left as it is.
"""

from __future__ import annotations

import argparse
import re

from .._errors import DiffinError, OutputExistsError, RunExistsError

# name=value, value: True/False, a quoted string, a number or a bare word; then an optional
# aside naming the flag that some messages already add for the command line, "(--flag)" or
# "(on the command line: --flag)" (dropped: the flag replaces the keyword).
_KEYWORD = re.compile(
    r"(?<![\w.-])([A-Za-z_]\w*)="
    r"(True|False|'[^']*'|\"[^\"]*\"|[-+]?\d[\w.+-]*|[A-Za-z_][\w.-]*)"
    r"(\s*\([^()]*?--[\w-]+[^()]*\))?"
)


def flag_table(parser: argparse.ArgumentParser) -> dict[tuple[str, object], str]:
    """How to say each keyword of ``parser``'s options on its command line.

    Keys ``(dest, const)`` for switches (``("overwrite", True)`` → ``"--overwrite"``) and
    ``(dest, None)`` for options that take a value (``("fd_eps", None)`` → ``"--fd-eps"``)."""
    table: dict[tuple[str, object], str] = {}
    for action in parser._actions:  # argparse's list of the parser's options (stable since 2.7)
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in (argparse.SUPPRESS, "help"):
            continue
        if action.nargs == 0:  # store_const / store_true / store_false: const is the value set
            table[(action.dest, action.const)] = longs[0]
        else:
            table[(action.dest, None)] = longs[0]
    return table


def in_cli_terms(message: str, table: dict[tuple[str, object], str]) -> str:
    """``message`` with every ``name=value`` of an option in ``table`` said as its flag."""

    def repl(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if value in ("True", "False"):
            flag = table.get((name, value == "True"))
            return flag if flag is not None else m.group(0)
        flag = table.get((name, None))
        if flag is None:
            return m.group(0)
        if value[0] in "'\"":
            value = value[1:-1]
        return f"{flag} {value}"

    return _KEYWORD.sub(repl, message)


def error_text(error: DiffinError, table: dict[tuple[str, object], str]) -> str:
    """What ``diffin`` prints for a library error: its type and message in command-line terms; an
    existing output the command could replace also names the flag that does (``--overwrite``)."""
    text = in_cli_terms(str(error), table)
    overwrite = table.get(("overwrite", True))
    if isinstance(error, (OutputExistsError, RunExistsError)) and overwrite and overwrite not in text:
        text += f"; pass {overwrite} to replace them"
    return f"{type(error).__name__}: {text}"
