"""Errors of the command line as one line a person can read.

jsonargparse reports a bad value as a tree (``Parser key "model": Does not
validate against any of the Union subtypes … Errors: - Problem with given
class_path …``) and a constructor's ``ValueError`` as the same tree ending in
a dump of the whole config. :func:`summarize` walks that tree to its first
real error and names the key, the allowed values and the given value.
:func:`report` prints it and exits with status 2; ``IRNET_TRACEBACK=1`` also
prints the traceback.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable, NoReturn, Optional, Sequence

TRACEBACK_ENV = "IRNET_TRACEBACK"
EXIT_CODE = 2

_NOISE = [
    re.compile(p)
    for p in (
        r"^Does not validate against any of the Union subtypes$",
        r"^Errors:$",
        r"^Given value type:",
        r"^Expected a <class 'NoneType'>$",
        r"^Expected a path but .* either not accessible or invalid$",
    )
]
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':$")
_SUBTYPES = re.compile(r"^Subtypes: \[(.*)\]$")
_GIVEN = re.compile(r"^Given value: (.*)$")
_CLASS = re.compile(r"<class '([\w.]+)'>")
_UNKNOWN_OPTION = re.compile(r"^Option '([^']+)' is not accepted$")
_EXPECTED = re.compile(r"^Expected a <class '([\w.]+)'>(?:\. Got value: (.*))?$")
_BAD_IMPORT = re.compile(
    r"has no attribute|No module named|Expected a dot import path string|"
    r"does not correspond to a subclass|Import path"
)
_SUBCOMMAND_OPTION = re.compile(r"^Subcommand '\w+' does not accept option '([^']+)'$")
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.*)$")


class CliError(Exception):
    """A mistake in the command line or config, reported as one line (exit status 2)."""


@dataclass
class _Frame:
    indent: int
    key: Optional[str] = None
    class_path: Optional[str] = None
    subtypes: list[str] = field(default_factory=list)
    given: Optional[str] = None


def _lines(message: str) -> list[tuple[int, str]]:
    """``(indent, text)`` of the message's meaningful lines; a leading ``- `` counts as indent."""
    out = []
    for raw in message.splitlines():
        text = raw.strip()
        indent = len(raw) - len(raw.lstrip())
        if text.startswith("- "):
            text, indent = text[2:].strip(), indent + 2
        if text and not any(p.search(text) for p in _NOISE):
            out.append((indent, text))
    return out


def _walk(message: str) -> tuple[list[_Frame], str]:
    """The enclosing frames (outermost first) and the text of the first leaf error."""
    stack: list[_Frame] = [_Frame(indent=-1)]
    lines = _lines(message)
    for i, (indent, text) in enumerate(lines):
        while len(stack) > 1 and stack[-1].indent >= indent:
            stack.pop()
        if (m := _SUBTYPES.match(text)) is not None:
            stack[-1].subtypes = _CLASS.findall(m.group(1))
            continue
        if (m := _GIVEN.match(text)) is not None:
            stack[-1].given = m.group(1)
            continue
        if (m := _PARSER_KEY.match(text)) is not None:
            if m.group(2):  # 'Parser key "config": File does not exist: …' is itself a leaf
                return [*stack, _Frame(indent, key=m.group(1))], m.group(2)
            stack.append(_Frame(indent, key=m.group(1)))
            continue
        if (m := _CLASS_PATH.match(text)) is not None:
            stack.append(_Frame(indent, class_path=m.group(1)))
            continue
        _collect_given(stack, lines[i + 1 :], indent)
        return stack, text
    return stack, message.strip().splitlines()[0] if message.strip() else "invalid configuration"


def _collect_given(stack: list[_Frame], rest: Sequence[tuple[int, str]], indent: int) -> None:
    """Fill the innermost frame's given value from a ``Given value:`` line that follows the leaf."""
    for later_indent, text in rest:
        if later_indent < indent - 2 and (m := _GIVEN.match(text)) is not None:
            if stack[-1].given is None:
                stack[-1].given = m.group(1)
            return


def key_path(frames: Sequence[_Frame], leaf_key: Optional[str] = None) -> str:
    """The dotted key as typed on the command line: ``model.net.init_args.theta``."""
    parts: list[str] = []
    classes = 0
    for frame in frames:
        if frame.class_path is not None:
            classes += 1
        if frame.key is not None:
            parts.append(
                frame.key if not parts else ("." if classes <= 1 else ".init_args.") + frame.key
            )
    if leaf_key is not None:
        parts.append(leaf_key if not parts else ("." if classes <= 1 else ".init_args.") + leaf_key)
    return "".join(parts)


def accepted_arguments(class_path: str) -> list[str]:
    """Constructor arguments of ``class_path`` (through ``**kwargs`` to its bases), or []."""
    cls = _import(class_path)
    if cls is None:
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            break
        names += [
            p.name
            for p in params
            if p.name != "self"
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in names
        ]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def known_subclasses(base_path: str, limit: int = 12) -> list[str]:
    """Importable names of the concrete subclasses of ``base_path`` that are loaded now."""
    base = _import(base_path)
    if base is None:
        return []
    found, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo += cls.__subclasses__()
        if not inspect.isabstract(cls) and not cls.__name__.startswith("_"):
            name = _public_name(cls)
            if not name.startswith(("pytorch_lightning.", "lightning.")) and name not in found:
                found.append(name)
    return sorted(found)[:limit]


def _public_name(cls: type) -> str:
    """``package.Name`` where the package exports the class, else ``module.Name``."""
    package = cls.__module__.rsplit(".", 1)[0]
    try:
        if getattr(importlib.import_module(package), cls.__name__, None) is cls:
            return f"{package}.{cls.__name__}"
    except ImportError:
        pass
    return f"{cls.__module__}.{cls.__name__}"


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _choices(names: Iterable[str], given: str) -> str:
    names = list(names)
    close = difflib.get_close_matches(given, names, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"accepted: {', '.join(names)}{hint}" if names else hint.lstrip("; ")


def summarize(message: str, options: Sequence[str] = (), config: Optional[dict] = None) -> str:
    """One line for a jsonargparse (or constructor) error message.

    Args:
        message: the error's text.
        options: the parser's option names (``trainer.max_epochs`` …) for suggestions.
        config: the flattened config (``{"model.init_args.lr": 0.01, …}``) to find
            the key of a constructor's ``ValueError`` (``"theta must be … got 1.5"``).
    """
    first = message.strip().splitlines()[0] if message.strip() else ""
    if (m := _UNRECOGNIZED.match(first)) is not None:
        words = m.group(1).split()
        flag = next((w for w in words if w.startswith("-")), words[0] if words else "?")
        close = difflib.get_close_matches(flag.lstrip("-").split("=")[0], options, n=1)
        hint = f"; did you mean --{close[0]}?" if close else ""
        return (
            f"unknown option {flag} (given: {' '.join(words)}){hint} "
            "(abbreviations are not accepted)"
        )
    if (m := _SUBCOMMAND_OPTION.match(first)) is not None:
        close = difflib.get_close_matches(m.group(1), options, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"unknown key {m.group(1)}{hint}"
    frames, leaf = _walk(message)
    owner = next((f.class_path for f in reversed(frames) if f.class_path), None)
    if (m := _UNKNOWN_OPTION.match(leaf)) is not None:
        names = accepted_arguments(owner) if owner else []
        return (
            f"unknown key {key_path(frames, m.group(1))} of {owner}; {_choices(names, m.group(1))}"
        )
    if (m := _EXPECTED.match(leaf)) is not None:
        given = m.group(2) if m.group(2) is not None else frames[-1].given
        return f"{key_path(frames)}: expected a value of type {m.group(1)}, got {given!r}"
    if _BAD_IMPORT.search(leaf):
        bases = next((f.subtypes for f in reversed(frames) if f.subtypes), [])
        named = re.search(r"string: (\S+)$", leaf)
        given = (
            frames[-1].class_path
            or (named.group(1) if named else None)
            or next((f.given for f in reversed(frames) if f.given), "?")
        )
        choices = [c for base in bases for c in known_subclasses(base)]
        allowed = f"; accepted: {', '.join(choices)}" if choices else ""
        return f"{key_path(frames)}: unknown class_path {given!r} ({leaf}){allowed}"
    where = key_path(frames) or _find_key(leaf, config)
    return f"{where}: {leaf}" if where else leaf


def _find_key(leaf: str, config: Optional[dict]) -> Optional[str]:
    """The config key a constructor's message names by its argument (``"theta must be …"``)."""
    if not config:
        return None
    name = re.match(r"^(\w+)\b", leaf)
    if name is None:
        return None
    keys = [k for k in config if k.rsplit(".", 1)[-1] == name.group(1)]
    given = re.search(r"got (.+?)\s*$", leaf)
    if len(keys) > 1 and given is not None:
        keys = [
            k for k in keys if given.group(1).strip("'\"") in (str(config[k]), repr(config[k]))
        ] or keys
    return cli_key(keys[0]) if len(keys) == 1 else None


def cli_key(key: str) -> str:
    """``model.init_args.net.init_args.theta`` as typed on the command line:
    ``model.net.init_args.theta``."""
    head, sep, rest = key.partition(".init_args.")
    return f"{head}.{rest}" if sep and "." not in head else key


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for a nested dict (or jsonargparse Namespace)."""
    if hasattr(tree, "as_dict"):
        tree = tree.as_dict()
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def wants_traceback() -> bool:
    """Whether ``IRNET_TRACEBACK`` asks for the full traceback."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def report(error: Exception, prog: str = "irnet") -> NoReturn:
    """Print ``error`` as one line (with the traceback if asked) and exit with status 2."""
    if wants_traceback():
        traceback.print_exception(error)
    else:
        _line(f"(set {TRACEBACK_ENV}=1 for the full traceback)")
    _line(f"{prog}: error: {error}")
    raise SystemExit(EXIT_CODE)


def _line(text: str) -> None:
    """``text`` and its newline in one write: under distributed training every process prints its
    line to the same stream, and ``print``'s two writes could interleave with another's."""
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()
