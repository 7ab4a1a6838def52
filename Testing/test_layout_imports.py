"""The import rule of WeakLiverSegLib (docs/ARCHITECTURE.md, "Layout and import rule"), checked on the source.

Every module's imports are parsed (ast), the lazy ones inside functions included:
* a package imports only itself, the packages below it (RANK) and the root (``errors``, ``__version__``);
* a recipe never imports another recipe (it goes through ``recipes.get``), and the registry
  ``recipes/__init__.py`` imports no recipe;
* slicer / qt / vtk / ctk are imported only in ``WeakLiverSegLib/slicer/``, and there only inside
  functions (``import WeakLiverSegLib.slicer.slicer_logic`` works without Slicer);
* module-level imports form no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "WeakLiverSegLib"
PKG = "WeakLiverSegLib"

# Lower rank = lower layer.  Same rank = independent peers: they may not import each other.
RANK = {
    "": 0,            # WeakLiverSegLib/__init__.py (__version__), errors.py
    "data": 1,
    "synth": 2, "anatomy": 2, "learn": 2, "evaluation": 2,
    "annotate": 3,
    "recipes": 4,
    "app": 5, "slicer": 6,
}
ENTRY_POINTS = {f"{PKG}.__main__"}   # python -m WeakLiverSegLib: runs app.cli
GUI_MODULES = {"slicer", "qt", "vtk", "vtkmodules", "ctk", "mrml", "PythonQt"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports(path: Path):
    """(absolute target modules, line, at module level?) of every import statement of one file.

    ``from X import a`` yields ``X.a`` when that is a module of ours, else ``X``.
    """
    name = module_name(path)
    package = name if is_package(path) else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top_level = {id(n) for n in ast.walk(tree) if not _inside_function(tree, n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((alias.name, node.lineno, id(node) in top_level))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if _is_our_module(sub) else target, node.lineno, id(node) in top_level))
    return out


def _inside_function(tree, node, _cache={}):
    key = id(tree)
    if key not in _cache:
        inside = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inside |= {id(n) for n in ast.walk(fn) if n is not fn}
        _cache[key] = inside
    return id(node) in _cache[key]


def _is_our_module(name: str) -> bool:
    if name != PKG and not name.startswith(PKG + "."):
        return False
    rel = Path(*name.split("."))
    return (LIB.parent / rel).with_suffix(".py").is_file() or (LIB.parent / rel / "__init__.py").is_file()


def layer(module: str) -> str:
    """'WeakLiverSegLib.learn.training' -> 'learn'; root modules -> ''."""
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and not (LIB / parts[1]).is_dir()):
        return ""
    return parts[1]


def recipe_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "recipes" else None


FILES = sorted(LIB.rglob("*.py"))


def test_every_package_has_a_rank_and_says_what_it_may_import():
    for folder in sorted(p for p in LIB.iterdir() if p.is_dir() and any(p.rglob("*.py"))):
        init = folder / "__init__.py"
        assert init.is_file(), f"{folder}: a package needs an __init__.py"
        assert folder.name in RANK, f"{folder.name}/: new package -- give it a place in RANK and in docs/ARCHITECTURE.md"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and "import" in doc, f"{init}: the docstring says what the package holds and what it may import"


def test_no_upward_or_sideways_import():
    bad = []
    for path in FILES:
        me = module_name(path)
        if me in ENTRY_POINTS:
            continue
        mine = layer(me)
        for target, line, _ in imports(path):
            if target != PKG and not target.startswith(PKG + "."):
                continue
            theirs = layer(target)
            if theirs == mine or theirs == "":
                continue
            if RANK[theirs] >= RANK[mine]:
                bad.append(f"{path.relative_to(LIB.parent)}:{line} ({mine or 'root'}) imports {target} ({theirs})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_recipes_stay_apart():
    bad = []
    for path in FILES:
        me = module_name(path)
        for target, line, _ in imports(path):
            other = recipe_of(target)
            if other is None:
                continue
            if me == f"{PKG}.recipes" or recipe_of(me) not in (None, other):
                bad.append(f"{path.relative_to(LIB.parent)}:{line} imports {target}")
    assert not bad, "a recipe is reached only through recipes.get:\n" + "\n".join(bad)


def test_slicer_qt_vtk_only_in_the_slicer_package_and_only_lazily():
    bad = []
    for path in FILES:
        rel = path.relative_to(LIB.parent)
        in_slicer = layer(module_name(path)) == "slicer"
        for target, line, top in imports(path):
            if target.split(".")[0] not in GUI_MODULES:
                continue
            if not in_slicer:
                bad.append(f"{rel}:{line} imports {target} outside WeakLiverSegLib/slicer/")
            elif top:
                bad.append(f"{rel}:{line} imports {target} at module level (import it inside the function)")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_at_module_level():
    graph = {}
    for path in FILES:
        graph[module_name(path)] = {t for t, _, top in imports(path) if top and _is_our_module(t)}
    done, stack = set(), []

    def visit(node):
        if node in stack:
            cycle = stack[stack.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_the_checks_see_imports(tmp_path):
    """The parser finds relative, absolute and lazy imports (guards the checks above against vacuity)."""
    found = {t for t, _, _ in imports(LIB / "app" / "cli.py")}
    assert f"{PKG}.errors" in found and f"{PKG}.recipes" in found and f"{PKG}.learn.modelstore" in found
    lazy = [(t, top) for t, _, top in imports(LIB / "slicer" / "slicer_bridge.py") if t == "slicer"]
    assert lazy and not any(top for _, top in lazy)
    assert layer(f"{PKG}.errors") == "" and layer(f"{PKG}.learn.networks.unet2d") == "learn"
    assert recipe_of(f"{PKG}.recipes.o2l.training") == "o2l" and recipe_of(f"{PKG}.recipes") is None


def test_cli_and_registry_import_no_recipe_and_a_network_loads_only_its_own():
    """``weakliverseg --help`` imports no recipe; a model's network class imports only its own module."""
    import os
    import subprocess
    import sys

    code = """
import sys
import WeakLiverSegLib.app.cli, WeakLiverSegLib.recipes
loaded = lambda: sorted({m.split('.')[2] for m in sys.modules if m.startswith('WeakLiverSegLib.recipes.')})
assert loaded() == [], loaded()
assert 'torch' not in sys.modules
from WeakLiverSegLib.learn.modelstore import network_class
assert network_class('VNet').__name__ == 'VNet' and loaded() == [], loaded()
assert network_class('CouinaudNet').__name__ == 'CouinaudNet' and loaded() == ['couinaud'], loaded()
assert network_class('os.system') is None
print('ok')
"""
    env = dict(os.environ, PYTHONPATH=str(LIB.parent), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
