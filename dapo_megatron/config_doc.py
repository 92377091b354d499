"""The config reference (docs/CONFIG.md), generated from the dataclasses in config.py.

Every key with its type, default and meaning; the meaning is the field's comment in
config.py (the comment on its line, or the comment lines right above it), so the reference
cannot say something the code does not. Regenerate after changing config.py:

    python -m dapo_megatron.config_doc --write

`tests/test_config_doc.py` fails when docs/CONFIG.md is out of date.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import types
import typing
from typing import Any, Literal

from dapo_megatron.config import DapoConfig

DOC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "CONFIG.md")
_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+?(?:=.*?)?(?:\s+#\s*(.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """name -> the comment documenting it in the class source."""
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = _FIELD.match(line) if not stripped.startswith(("def ", "@", '"""')) else None
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            parts = pending + ([m.group(2).strip()] if m.group(2) else [])
            out[m.group(1)] = " ".join(p for p in parts if p)
        pending = []
    return out


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " \\| ".join(_type_name(a) for a in inner) + (" \\| null" if len(inner) < len(args) else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return ""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from `dapo_megatron/config.py` by `python -m dapo_megatron.config_doc --write`;",
        "do not edit by hand. A run's config is a YAML file of these sections plus dotted",
        "overrides on the command line (`dapo-megatron train cfg.yaml algo.eps_high=0.28`).",
        "A file may start from another with `extends: other.yaml` (relative to the file): the",
        "other file's sections, then this file's keys over them (`name` is not inherited).",
        "",
    ]
    top = typing.get_type_hints(DapoConfig)
    for f in dataclasses.fields(DapoConfig):
        cls = top[f.name]
        if not dataclasses.is_dataclass(cls):
            lines += [f"`{f.name}`: {_type_name(cls)}, default {_default(f)}.", ""]
            continue
        lines += [f"## `{f.name}`", ""]
        doc = inspect.getdoc(cls) or ""
        if doc:
            lines += [doc.split("\n\n")[0].replace("\n", " "), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        hints, comments = typing.get_type_hints(cls), field_comments(cls)
        for sub in dataclasses.fields(cls):
            meaning = comments.get(sub.name, "").replace("|", "\\|")
            lines.append(f"| `{f.name}.{sub.name}` | {_type_name(hints[sub.name])} | "
                         f"{_default(sub)} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print (or --write) docs/CONFIG.md")
    parser.add_argument("--write", action="store_true", help=f"write {DOC_PATH}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        with open(DOC_PATH, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
