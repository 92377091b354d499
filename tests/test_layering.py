"""The package's layering (docs/DESIGN.md, "Packages and what each may import").

A static walk of every `import` in dapo_megatron, at module level and inside functions
alike (a function-level import is how an import circle usually hides), so the rules hold
for every code path, not only for what one test happens to import.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "dapo_megatron"

# What each part of the package may import from the rest of it (docs/DESIGN.md). A part is
# a subpackage or a top-level module; imports inside one part are always allowed.
ALLOWED = {
    "errors": set(),
    "config": {"errors", "resolve"},
    "resolve": {"convert", "errors"},
    "dtypes": set(),
    "malloc": set(),
    "ports": set(),
    "watchdog": set(),
    "algo": {"dtypes"},
    "reward": set(),
    "data": {"reward"},
    "convert": {"dtypes"},
    "rollout": {"dtypes", "malloc", "ports", "resolve", "watchdog"},
    "policy": {"algo", "convert", "dtypes", "ports", "resolve", "rollout"},
    "plan": {"config", "convert", "errors", "resolve"},
    "launch": {"config"},
    "config_doc": {"config"},
    "convert_hf": {"convert", "dtypes", "malloc", "policy", "ports"},
    "controller": {"algo", "config", "convert", "data", "dtypes", "malloc", "policy", "ports", "resolve", "reward",
                   "rollout", "watchdog"},
    "eval": {"controller"},
    "cli": {"config", "controller", "eval", "plan"},
}


def _modules(root: str = ROOT) -> dict[str, str]:
    """Dotted module name -> file, for every .py file of the package."""
    mods = {}
    for folder, _, files in os.walk(os.path.join(root, PKG)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                mods[dotted.removesuffix(".__init__")] = path
    return mods


def import_graph(mods: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (`from pkg import submodule` counts as the
    submodule; `from pkg import name` as pkg's __init__)."""

    def known(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        is_pkg = path.endswith("__init__.py")
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names if a.name.split(".")[0] == PKG}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    parent = mod.split(".")[: len(mod.split(".")) - node.level + is_pkg]
                    base = ".".join(parent + ([base] if base else []))
                if base.split(".")[0] != PKG:
                    continue
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.add(full if full in mods else known(base))
        graph[mod] = targets - {mod, PKG}
    return graph


def _part(mod: str) -> str:
    return mod.split(".")[1]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


@pytest.fixture(scope="module")
def graph():
    return import_graph(_modules())


def test_no_import_circle_in_the_package(graph):
    assert find_cycles(graph) == []


def test_convert_imports_nothing_above_it(graph):
    upward = {m: sorted(d for d in deps if _part(d) in ("policy", "controller"))
              for m, deps in graph.items() if m.startswith(f"{PKG}.convert.")}
    assert {m: d for m, d in upward.items() if d} == {}


def test_every_part_imports_only_what_the_design_allows(graph):
    parts = {_part(m) for m in graph if m != PKG}
    assert parts == set(ALLOWED), "a new package/module: add it to ALLOWED and docs/DESIGN.md"
    wrong = sorted(f"{m} imports {d}" for m, deps in graph.items() if m != PKG
                   for d in deps if _part(d) != _part(m) and _part(d) not in ALLOWED[_part(m)])
    assert wrong == []


def test_the_walk_sees_circles_and_upward_imports(tmp_path):
    """The checks above can fail: a planted circle (one side a function-level import) and a
    convert/ module importing policy/ are both found."""
    pkg = tmp_path / PKG
    for sub in ("", "convert", "policy"):
        (pkg / sub).mkdir(exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from dapo_megatron import b\n")
    (pkg / "b.py").write_text("def f():\n    from dapo_megatron.a import thing\n")
    (pkg / "convert" / "x.py").write_text("from .. import policy\nimport dapo_megatron.policy.m\n")
    (pkg / "policy" / "m.py").write_text("")
    g = import_graph(_modules(str(tmp_path)))
    assert find_cycles(g) == [[f"{PKG}.a", f"{PKG}.b"]]
    assert g[f"{PKG}.convert.x"] == {f"{PKG}.policy", f"{PKG}.policy.m"}
