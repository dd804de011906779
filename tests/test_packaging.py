"""What the code imports is what setup.py declares (issue: a fresh install missed jinja2).

The fresh-venv run of the README's commands in ``.ci/run`` is the end-to-end check; these tests
name the missing requirement without a fresh install: every third-party module that
``dpo_jax/`` imports belongs to a distribution setup.py declares (a module-level import in
``install_requires``, a function-level one at least in an extra), and the packages that
``transformers`` imports only when a feature is used (not among its own requirements) are
declared when the code uses that feature.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A call in dpo_jax/ -> the package transformers imports lazily for it (transformers'
# ``requires_backends``); both stay out of transformers' own install requirements.
LAZY_BACKENDS = {"apply_chat_template": "jinja2"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(specs: list[str]) -> set[str]:
    return {_norm(re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0]) for s in specs}


def _declared() -> tuple[set[str], set[str]]:
    """(install_requires, every extra) as normalised distribution names, read from setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords
          if k.arg in ("install_requires", "extras_require")}
    extras = [s for specs in kw.get("extras_require", {}).values() for s in specs]
    return _requirement_names(kw["install_requires"]), _requirement_names(extras)


def _imports() -> tuple[dict[str, str], dict[str, str]]:
    """Third-party top-level modules imported by dpo_jax/: (module level, inside functions),
    each mapped to the first file that imports it."""
    top, lazy = {}, {}
    for path in sorted((ROOT / "dpo_jax").rglob("*.py")):
        tree = ast.parse(path.read_text())
        inside = {id(n) for f in ast.walk(tree)
                  if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                mod = name.split(".")[0]
                if mod in sys.stdlib_module_names or mod == "dpo_jax" or mod == "__future__":
                    continue
                (lazy if id(node) in inside else top).setdefault(
                    mod, str(path.relative_to(ROOT)))
    return top, lazy


@functools.lru_cache(maxsize=None)
def _module_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed package: once


def _distributions(module: str) -> set[str]:
    """Distributions that provide ``module``; a module not installed here (an extra such as
    wandb) stands for the distribution of the same name."""
    found = _module_distributions().get(module, [])
    return {_norm(d) for d in found} or {_norm(module)}


def test_every_module_level_import_is_an_install_requirement():
    required, _ = _declared()
    top, _ = _imports()
    assert {"jax", "numpy", "flax"} <= set(top)  # the walk sees the imports
    missing = {m: f for m, f in top.items() if not _distributions(m) & required}
    assert not missing, f"imported at module level but not in install_requires: {missing}"


def test_every_function_level_import_is_declared():
    required, extras = _declared()
    _, lazy = _imports()
    missing = {m: f for m, f in lazy.items() if not _distributions(m) & (required | extras)}
    assert not missing, f"imported but declared nowhere in setup.py: {missing}"


def test_packages_transformers_imports_lazily_are_declared_when_used():
    required, _ = _declared()
    source = "\n".join(p.read_text() for p in (ROOT / "dpo_jax").rglob("*.py"))
    used = {call: pkg for call, pkg in LAZY_BACKENDS.items() if call in source}
    assert used, "the feature table no longer matches the code: update LAZY_BACKENDS"
    missing = {call: pkg for call, pkg in used.items() if _norm(pkg) not in required}
    assert not missing, f"used features whose lazy backend is not in install_requires: {missing}"
    # and the backend really is lazy in transformers (not a requirement of its own), so nothing
    # else would bring it in a fresh venv
    own = _requirement_names(
        r for r in (importlib.metadata.requires("transformers") or []) if "extra ==" not in r)
    assert not {_norm(p) for p in used.values()} & own
