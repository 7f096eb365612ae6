"""The import-layer contract (pyproject.toml `[tool.importlinter]`): jobs and CLI on top, the architecture
description at the bottom; a library module that imports a job, or a module that imports a sibling its layer
declares independent, breaks it. The package has no import cycle, no import of a project module by a string
name (which the contract cannot see) and no import of another module's private name."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
needs_lint = pytest.mark.skipif(not LINT.exists(), reason="import-linter not installed: pip install -e '.[dev]'")


def _contract() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    # `--no-cache`: the copy below must be read afresh; PYTHONPATH first so that copy is the one analysed.
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300, check=False)


def test_every_module_has_a_layer():
    """A new module or subpackage must be placed in the contract, or it would be unchecked: the packages in
    the top-level contract, the modules of each layered package in that package's own contract."""
    contracts = _contract()["contracts"]

    def placed(contract: dict) -> set[str]:
        return {name.strip() for layer in contract["layers"] for name in layer.replace("|", ":").split(":")}

    package = ROOT / "lightning_drop"
    top = {f"lightning_drop.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    top |= {f"lightning_drop.{p.parent.name}" for p in package.glob("*/__init__.py")}
    assert placed(contracts[0]) == top, "top-level modules and packages vs the first contract's layers"
    inner = [c for c in contracts[1:] if c.get("containers")]
    assert inner, "the layered packages have contracts of their own"
    for contract in inner:
        (container,) = contract["containers"]
        folder = package / container.split(".", 1)[1].replace(".", "/")
        members = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
        members |= {p.parent.name for p in folder.glob("*/__init__.py")}
        assert placed(contract) == members, f"{container}: its modules vs its contract's layers"


@needs_lint
def test_contract_is_kept():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "6 kept, 0 broken" in run.stdout


def _copy_with(tmp_path: Path, module: str, extra: str) -> Path:
    """A copy of the repository's package and contract where `module` (a file under lightning_drop/) has
    `extra` appended."""
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy)
    shutil.copytree(ROOT / "lightning_drop", copy / "lightning_drop",
                    ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / "lightning_drop" / module
    path.write_text(path.read_text() + "\n\n" + extra)
    return copy


#: (file changed, import appended inside a function, what the linter must report): a library module importing
#: a job; `evaluation | speed`, which share a layer, knowing each other
BREAKS = [
    ("scoring/selection.py", "from ..jobs import drop", "lightning_drop.scoring is not allowed to import lightning_drop.jobs"),
    ("measure/evaluation.py", "from . import speed", "- lightning_drop.measure.evaluation -> lightning_drop.measure.speed (l."),
]


@needs_lint
@pytest.mark.parametrize("module,statement,report", BREAKS, ids=[b[0] for b in BREAKS])
def test_an_import_against_the_layers_breaks_it(tmp_path, module, statement, report):
    copy = _copy_with(tmp_path, module, f"def _bad() -> None:\n    {statement}  # noqa: F401\n")
    run = _lint(copy)
    assert run.returncode != 0
    assert report in run.stdout


# ------------------------------------------------------------------ cycles, string imports, private names
def import_graph(package_dir: Path) -> tuple[dict[str, set[str]], list[str], list[str]]:
    """(module -> project modules it imports, string imports, private-name imports) of the package at
    `package_dir`, read from its source: module- and function-level imports, relative ones, and
    `importlib.import_module` / `__import__` of a literal project name."""
    package = package_dir.name
    files = {}
    for path in package_dir.rglob("*.py"):
        name = ".".join(path.relative_to(package_dir.parent).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = path

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in files}
    strings, private = [], []
    for module, path in files.items():
        base = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[tuple[str, str | None]] = []
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    parent = base
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    source = parent + ("." + source if source else "")
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.append((submodule, None) if submodule in files else (source, alias.name))
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                    "import_module", "__import__"):
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and \
                        arg.value.split(".")[0] == package:
                    strings.append(f"{module} -> {arg.value}")
                    targets = [(arg.value, None)]
            for name, attr in targets:
                target = resolve(name) if name.split(".")[0] == package else None
                if target is None or target == module:
                    continue
                edges[module].add(target)
                if attr and attr.startswith("_") and not attr.startswith("__"):
                    private.append(f"{module} imports {target}.{attr}")
    return edges, strings, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module; a package importing its own submodules (or a
    submodule its package) is not a cycle: that is how a package exports."""
    def related(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    graph = {m: {t for t in ts if not related(m, t)} for m, ts in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_cycle_no_string_import_no_private_name():
    edges, strings, private = import_graph(ROOT / "lightning_drop")
    assert len(edges) > 60
    assert cycles(edges) == []
    assert strings == []
    assert private == []


def test_the_graph_check_sees_a_cycle_a_string_import_and_a_private_name(tmp_path):
    """The checks above must fail when the package breaks them: a cycle closed by an import inside a
    function, a string import and a private name, each written the way the package writes imports."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import run\n")
    (pkg / "a.py").write_text("from .sub.b import helper\n\ndef run():\n    return helper()\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def helper():\n    from ..c import _private\n    return _private\n")
    (pkg / "c.py").write_text("import importlib\n_private = 1\n\ndef later():\n"
                              "    return importlib.import_module('pkg.a')\n")
    edges, strings, private = import_graph(pkg)
    assert cycles(edges) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert strings == ["pkg.c -> pkg.a"]
    assert private == ["pkg.sub.b imports pkg.c._private"]
    (pkg / "c.py").write_text("_private = 1\n")
    assert cycles(import_graph(pkg)[0]) == []


def _unused_imports(source: str) -> list[str]:
    """Names a module imports at its top level and never uses: a name kept importable from a module it moved
    out of (a re-export), or a dead import. Package `__init__` files, which export on purpose, are not read."""
    tree = ast.parse(source)
    imported: dict[str, int] = {}
    for node in tree.body:
        stmts = [node] if isinstance(node, (ast.Import, ast.ImportFrom)) else (
            [s for s in node.body if isinstance(s, (ast.Import, ast.ImportFrom))] if isinstance(node, ast.Try) else [])
        for stmt in stmts:
            if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
                continue
            for alias in stmt.names:
                if not isinstance(stmt, ast.ImportFrom) and alias.asname is None:
                    continue  # `import a.b` binds `a` to register or load something for its side effects
                imported[alias.asname or alias.name] = stmt.lineno
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return [f"l.{line}: {name}" for name, line in sorted(imported.items(), key=lambda kv: kv[1]) if name not in used]


def test_no_module_keeps_names_it_does_not_use():
    """Before 1.0 a moved name is not kept alive at its old address: every user imports it from where it
    lives, so a module's top-level imports are all used there (the check fails on a re-export)."""
    found = {}
    for path in sorted((ROOT / "lightning_drop").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        unused = _unused_imports(path.read_text())
        if unused:
            found[str(path.relative_to(ROOT))] = unused
    assert found == {}
    assert _unused_imports("from .a import used, moved\nprint(used)\n") == ["l.1: moved"]
