"""The shape of the house: no import cycles, kernels usable on their own, data flowing one way.

The import graph is read from the source (every ``import`` statement, at module level or inside a
function, except those under ``if TYPE_CHECKING:``), so a lazy import inside a function counts:
a cycle hidden behind one still means two modules that cannot be understood apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lmforge", "kernels")


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts[0] == "kernels":  # kernels/ installs as lmforge.kernels
                parts = ["lmforge", *parts]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every import statement in ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _owning_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".")
            if MODULES[module].name != "__init__.py":
                here = here[:-1]
            here = here[: len(here) - (node.level - 1)]
            base = ".".join(here + ([node.module] if node.module else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            # ``from pkg import submodule`` depends on the submodule, not on pkg's __init__.
            names.append(sub if sub in MODULES else base)
    out = {_owning_module(name) for name in names}
    return {m for m in out if m and m != module}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        deps: set[str] = set()
        for node in _import_nodes(tree):
            deps |= _targets(module, node)
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _describe(graph: dict[str, set[str]], comp: list[str]) -> str:
    members = set(comp)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in comp)


def test_no_import_cycles():
    graph = import_graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + " | ".join(_describe(graph, c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_lazy_imports_and_skips_type_checking(tmp_path):
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import lmforge.model\n"
        "def f():\n    from lmforge import ops\n"
    )
    names = {n.module or n.names[0].name for n in _import_nodes(tree)}
    assert names == {"typing", "lmforge"}


def test_kernels_stand_alone():
    """kernels/ needs torch and triton only: nothing from Lightning or lmforge's framework."""
    allowed_third_party = {"torch", "triton", "numpy"}
    stdlib = set(__import__("sys").stdlib_module_names)
    offenders = []
    for module, path in MODULES.items():
        if not module.startswith("lmforge.kernels"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _import_nodes(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            roots = (
                [a.name.split(".")[0] for a in node.names]
                if isinstance(node, ast.Import)
                else [(node.module or "").split(".")[0]]
            )
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            )
            for root, name in zip(roots, names):
                if root in stdlib or root in allowed_third_party or name.startswith("lmforge.kernels"):
                    continue
                offenders.append(f"{module} imports {name}")
    assert not offenders, offenders


@pytest.mark.parametrize(
    "module",
    [
        "lmforge.data.sft",
        "lmforge.data.pretrain",
        "lmforge.data.classify",
        "lmforge.data.examples",
        "lmforge.data.records",
        "lmforge.data.chat",
        "lmforge.data.packing",
    ],
)
def test_data_modules_do_not_reach_up(module):
    """A data module is handed its tokenizer and lengths (connect); it never reads the trainer's model."""
    path = MODULES.get(module)
    if path is None:
        pytest.skip(f"{module} is a package")
    source = path.read_text(encoding="utf-8")
    assert "lightning_module" not in source, f"{module} reaches up to trainer.lightning_module"


def test_readme_map_matches_the_package():
    """README's "Where things live" names every top-level module of lmforge/, and only modules that exist."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^(lmforge/[\w/]+\.py)", section, flags=re.M))
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"README names modules that do not exist: {missing}"
    modules = {f"lmforge/{p.name}" for p in (ROOT / "lmforge").glob("*.py") if not p.name.startswith("__")}
    unnamed = sorted(modules - named)
    assert not unnamed, f"README's map leaves out: {unnamed}"
