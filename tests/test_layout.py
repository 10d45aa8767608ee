"""The package's shape: short functions, a module constructor of few arguments, no import cycle among its modules,
every imported library declared.

Read from the source, not run.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scmixvae"
MAX_FUNCTION_LINES = 80
MAX_TRAIN_LINES = 60
MAX_MODULE_ARGUMENTS = 15


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function from its ``def`` to its end, its docstring left out."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    return [
        (f"{name}:{node.name}", node)
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def imported_modules(name: str, path: Path) -> set[str]:
    """The package's modules that module ``name`` imports anywhere in its source (lazy imports included).

    ``from package import name`` counts as an import of the submodule where ``name`` is one, else of the package.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            submodules = {f"{target}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= submodules if len(submodules) == len(node.names) else {target, *submodules}
    return (found & MODULES.keys()) - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_function_is_longer_than_80_lines_and_train_at_most_60():
    lengths = {name: code_lines(node) for name, node in functions()}
    assert len(lengths) > 200  # the whole package was read
    assert {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES} == {}
    assert lengths["scmixvae.model._model:train"] <= MAX_TRAIN_LINES


def test_the_module_constructor_takes_at_most_15_arguments():
    tree = ast.parse((PACKAGE / "module" / "_module.py").read_text())
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "CplMixVAEModule"]
    (init,) = [node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "__init__"]
    arguments = [arg.arg for arg in init.args.posonlyargs + init.args.args + init.args.kwonlyargs]
    assert arguments[0] == "self" and "covariates" in arguments
    assert len(arguments) - 1 <= MAX_MODULE_ARGUMENTS
    assert init.args.vararg is None and init.args.kwarg is None


def test_code_lines_leave_the_docstring_out():
    source = 'def f():\n    """One\n    two."""\n    return 1\n'
    assert code_lines(ast.parse(source).body[0]) == 2


def test_no_import_cycle_among_the_modules():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    assert "scmixvae.model._fit" in graph["scmixvae.model._pruning"]  # imports are found
    assert cycles(graph) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]), ({"a": {"b"}, "b": set()}, [])],
)
def test_cycles_are_found(graph, expected):
    assert cycles(graph) == expected


def third_party_imports(source: str) -> set[str]:
    """Top-level names of the modules outside the standard library that ``source`` imports (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in ("__future__", "scmixvae")}


def canonical(requirement: str) -> str:
    """The distribution name of a requirement string, normalised (``"scvi-tools>=1.4"`` -> ``"scvi-tools"``)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)).lower()


def undeclared(imports: dict[str, set[str]], declared: set[str], distributions: dict[str, list[str]]) -> dict:
    """Imported module name -> importing files, for every module whose distribution is not declared."""
    return {
        module: sorted(files)
        for module, files in imports.items()
        if not {canonical(d) for d in distributions.get(module, [])} & declared
    }


def test_every_imported_library_is_a_declared_dependency():
    """A library the package imports must not reach the user only as a dependency of a dependency."""
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    declared = {canonical(requirement) for requirement in project["dependencies"]}
    imports = {}
    for path in MODULES.values():
        for module in third_party_imports(path.read_text()):
            imports.setdefault(module, set()).add(str(path.relative_to(PACKAGE.parent)))
    assert {"torch", "scvi", "lightning"} <= imports.keys()  # the sources were read
    assert undeclared(imports, declared, packages_distributions()) == {}


def test_an_undeclared_import_is_found():
    source = "import numpy, os\nfrom lightning.pytorch import Trainer\nfrom . import x\n"
    source += "def f():\n    import rich.pretty\n"
    assert third_party_imports(source) == {"numpy", "lightning", "rich"}
    imports = {name: {"a.py"} for name in ("numpy", "lightning", "rich", "absent")}
    distributions = {"numpy": ["numpy"], "lightning": ["lightning"], "rich": ["rich"]}
    found = undeclared(imports, {canonical("NumPy>=1.2"), canonical("rich")}, distributions)
    assert found == {"lightning": ["a.py"], "absent": ["a.py"]}
