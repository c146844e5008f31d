"""`pip install .` brings what the project imports, and only that: no test or lint tools.

The runtime dependencies in pyproject.toml are compared with the imports of the five packages
(read with ast, not by importing them). The benchmarks `simulations/bench_*.py` compare with
statsmodels and lifelines; they run in the dev environment (`make bench`).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "analyses", "site_node", "coordinator", "simulations")
#: Declared for their version range, imported only through another dependency.
INDIRECT = {
    "starlette": "fastapi's own dependency; the range flwr accepts is declared here",
}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def runtime_dependencies() -> set[str]:
    return {
        canonicalize_name(Requirement(spec).name) for spec in pyproject()["project"]["dependencies"]
    }


def extra_dependencies() -> set[str]:
    """What the optional extras add (``pip install 'alliance[sklearn]'``): imported lazily,
    inside the function that needs them, which says which extra to install."""
    extras = pyproject()["project"]["optional-dependencies"].values()
    return {canonicalize_name(Requirement(s).name) for specs in extras for s in specs}


def dev_only() -> set[str]:
    dev = {canonicalize_name(Requirement(s).name) for s in pyproject()["dependency-groups"]["dev"]}
    return dev - runtime_dependencies()


def third_party_imports(path: Path) -> set[str]:
    """Top-level names a module imports, other than the standard library and our packages."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"}


@functools.cache
def installed_providers() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def distributions(import_name: str) -> set[str]:
    """The installed distributions that provide a top-level import name."""
    return {canonicalize_name(name) for name in installed_providers().get(import_name, [])}


def runtime_modules() -> list[Path]:
    return [
        path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if not path.name.startswith("bench_")
    ]


def undeclared_imports(paths: list[Path], declared: set[str]) -> list[str]:
    problems = []
    for path in paths:
        for name in sorted(third_party_imports(path)):
            found = distributions(name)
            if not found & declared:
                what = ", ".join(sorted(found)) or "no installed distribution"
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                problems.append(f"{where} imports {name} ({what})")
    return problems


def test_every_import_of_the_project_is_a_runtime_dependency() -> None:
    # Otherwise `pip install .` gives a site node that dies on an ImportError, or one that
    # needs a test tool (statsmodels, lifelines, pytest) installed at the hospital.
    declared = runtime_dependencies() | extra_dependencies()
    assert undeclared_imports(runtime_modules(), declared) == []


def test_an_extra_is_imported_only_inside_the_function_that_needs_it() -> None:
    # `pip install .` without the extra must still import every module.
    extras = extra_dependencies() - runtime_dependencies()
    problems = []
    for path in runtime_modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                if distributions(name.split(".")[0]) & extras:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert problems == []
    assert {"scikit-learn", "skl2onnx"} <= extras


def test_the_import_check_would_catch_a_test_tool_in_runtime_code(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def fit():\n    import statsmodels.api as sm\n    from lifelines import a\n")
    problems = undeclared_imports([bad], runtime_dependencies())
    assert [p.split(" imports ")[1].split(" ")[0] for p in problems] == ["lifelines", "statsmodels"]
    assert {"statsmodels", "lifelines", "pytest", "mypy", "grpcio-tools"} <= dev_only()


def test_every_runtime_dependency_is_imported() -> None:
    # A dependency nothing imports only slows the install (scikit-learn was one).
    imported: set[str] = set()
    for path in runtime_modules():
        for name in third_party_imports(path):
            imported |= distributions(name)
    unused = runtime_dependencies() - imported - set(INDIRECT)
    assert unused == set()
