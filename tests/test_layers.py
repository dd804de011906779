"""The package's layers (issue 29): dpo_jax's import graph, module-level AND function-local
imports parsed with ``ast``, has no cycle; no function does a dpo_jax import except the short
allow-list below (each with its reason); no module is over 450 lines.

Static: nothing is imported, so a cycle hidden by a function-local import is seen too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "dpo_jax"
MAX_LINES = 450

# (module, imported dpo_jax module) -> why the import stays inside a function.
LOCAL_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {
    ("dpo_jax.main", "dpo_jax.distributed"):
        "main() sets XLA_FLAGS (set_xla_flags) before anything imports jax (test_main_flags.py)",
    ("dpo_jax.main", "dpo_jax.tasks"): "as above: the tasks import jax",
    ("dpo_jax.distributed", "dpo_jax.sharding"):
        "distributed.py imports no jax at module level, so main can plan "
        "jax.distributed.initialize after setting XLA_FLAGS; the memory estimate loads it",
    ("dpo_jax.distributed", "dpo_jax.models"): "as above (the memory estimate builds a Model)",
}


def module_files(pkg: pathlib.Path = PKG) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py file under ``pkg`` (packages by name)."""
    out = {}
    for f in sorted(pkg.rglob("*.py")):
        name = ".".join(f.relative_to(pkg.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _targets(mods: dict[str, pathlib.Path], cur: str, node: ast.AST) -> set[str]:
    """The dpo_jax modules an ``import`` / ``from ... import`` statement in ``cur`` loads (its
    longest prefix that is a module; ``from pkg import mod`` names ``pkg.mod``)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = cur.split(".")
            keep = len(parts) - node.level + (mods[cur].name == "__init__.py")
            base = ".".join(parts[:keep] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = set()
    for n in names:
        while n and n not in mods:
            n = n.rpartition(".")[0]
        if n.startswith("dpo_jax") and n != cur:
            out.add(n)
    return out


def import_graph(mods: dict[str, pathlib.Path]):
    """(edges, local): module -> the dpo_jax modules it imports anywhere (module level,
    functions, classes; ``if TYPE_CHECKING:`` blocks excluded), and the list of
    ``(module, target, line)`` of the imports made inside a function."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    local: list[tuple[str, str, int]] = []

    def visit(name, node, in_fn):
        for c in ast.iter_child_nodes(node):
            if isinstance(c, ast.If) and "TYPE_CHECKING" in ast.dump(c.test):
                continue
            if isinstance(c, (ast.Import, ast.ImportFrom)):
                if isinstance(c, ast.ImportFrom) and c.module == "__future__":
                    continue
                t = _targets(mods, name, c)
                edges[name] |= t
                if in_fn:
                    local.extend((name, x, c.lineno) for x in sorted(t))
            visit(name, c, in_fn or isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                   ast.Lambda)))

    for name, f in mods.items():
        visit(name, ast.parse(f.read_text(), str(f)), False)
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_sees_a_two_and_a_three_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "a"}, "f": {"a"}}
    assert sorted(cycles(edges)) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_a_function_local_import_closing_a_cycle_is_found(tmp_path):
    """The parser on a package written here: the cycle p.x -> p.y -> p.x exists only through
    an import inside a function, and ``from p import y`` / ``from .x import f`` resolve."""
    pkg = tmp_path / "dpo_jax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "x.py").write_text("from dpo_jax.sub import y\n")
    (pkg / "sub" / "y.py").write_text("def f():\n    from .x import g\n    return g\n")
    (pkg / "sub" / "z.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dpo_jax.sub import x\n")
    mods = module_files(pkg)
    edges, local = import_graph(mods)
    assert cycles(edges) == [["dpo_jax.sub.x", "dpo_jax.sub.y"]]
    assert local == [("dpo_jax.sub.y", "dpo_jax.sub.x", 2)]
    assert edges["dpo_jax.sub.z"] == set()


def test_no_import_cycles_including_function_local_imports():
    edges, _ = import_graph(module_files())
    assert cycles(edges) == [], (
        "import cycles between dpo_jax modules (module-level and function-local imports): "
        "move the shared piece down a layer (ARCHITECTURE.md, 'Layers')")


def test_no_function_local_dpo_jax_imports_outside_the_allow_list():
    _, local = import_graph(module_files())
    extra = [f"{m}:{line} imports {t}" for m, t, line in local
             if (m, t) not in LOCAL_IMPORTS_ALLOWED]
    assert not extra, ("function-local imports of dpo_jax modules (import at module level, or "
                       "add the pair to LOCAL_IMPORTS_ALLOWED with its reason):\n"
                       + "\n".join(extra))


@pytest.mark.parametrize("name", sorted(module_files()))
def test_no_module_over_450_lines(name):
    n = len(module_files()[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{name}: {n} lines > {MAX_LINES}; split it along a layer"
