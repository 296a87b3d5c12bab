"""``--model.net.init_args.contraction null`` on the command line: a null inside a nested class.

jsonargparse (4.53) rejects ``null`` given with a dotted option inside a class
that is itself an argument of a subclass-typed model or data module
("expected a value of type float, got 'None'"), although the same null is
accepted from a config file or in the JSON form ``--model.net
'{"init_args": {"contraction": null}}'``. :func:`spell_nested_nulls` rewrites
the first form into the second before parsing, so both spellings work.
"""

from __future__ import annotations

import json
from typing import Sequence

NULLS = ("null", "None", "none", "~")  # YAML's spellings of null (and Python's, as users type it)


def spell_nested_nulls(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--a.b.c null`` (or ``--a.b.c=null``) nested two classes deep written as
    ``--a.b {"init_args": {"c": null}}``; every other argument unchanged."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        key, value, used = _option(args, i)
        parent = _nested_parent(key) if value in NULLS else None
        if parent is None:
            out.append(arg)
            i += 1
            continue
        out += [f"--{parent[0]}", json.dumps({"init_args": {parent[1]: None}})]
        i += used
    return out


def _option(args: list[str], i: int) -> tuple[str, str | None, int]:
    """``(key, value, arguments used)`` of the option at ``args[i]`` (key '' if it is none)."""
    arg = args[i]
    if not arg.startswith("--"):
        return "", None, 1
    if "=" in arg:
        key, value = arg[2:].split("=", 1)
        return key, value, 1
    value = args[i + 1] if i + 1 < len(args) else None
    return arg[2:], value, 2


def _nested_parent(key: str) -> tuple[str, str] | None:
    """``("model.net", "contraction")`` for ``model.net.init_args.contraction`` or
    ``model.net.contraction``; None for keys at most one class deep (``model.lr``,
    ``trainer.max_epochs``), which parse as they are."""
    parts = key.split(".")
    if len(parts) < 3 or len([p for p in parts if p != "init_args"]) < 3:
        return None
    *parent, name = parts
    if parent[-1] == "init_args":
        parent = parent[:-1]
    return ".".join(parent), name
