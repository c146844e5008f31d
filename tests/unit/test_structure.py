"""Project rules that a test can check: layer boundaries and fresh generated stubs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "analyses", "site_node", "coordinator", "simulations")
#: Which project packages each package may import (STYLE.md: protocol < analyses < roles < sims).
ALLOWED = {
    "protocol": {"protocol"},
    "analyses": {"protocol", "analyses"},
    "site_node": {"protocol", "analyses", "site_node"},
    "coordinator": {"protocol", "analyses", "coordinator"},
    "simulations": set(PACKAGES),
}


def project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_runs_against_the_layers(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = project_imports(path) - ALLOWED[package]
        if wrong:
            offenders.append(f"{path.relative_to(ROOT)} imports {', '.join(sorted(wrong))}")
    assert offenders == []


def test_the_boundary_check_would_catch_a_role_importing_the_other(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from site_node.runtime import SiteRuntime\nimport coordinator.link\n")
    assert project_imports(bad) == {"site_node", "coordinator"}


def test_generated_grpc_stubs_are_fresh(tmp_path: Path) -> None:
    proto = Path("protocol/wire/alliance.proto")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(proto),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for name in ("alliance_pb2.py", "alliance_pb2_grpc.py", "alliance_pb2.pyi"):
        fresh = (tmp_path / "protocol" / "wire" / name).read_text()
        committed = (ROOT / "protocol" / "wire" / name).read_text()
        assert fresh == committed, f"protocol/wire/{name} is stale: run `make proto`"


def test_one_version_taken_from_the_package_metadata() -> None:
    import tomllib

    from protocol.version import VERSION

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert declared == VERSION
    sources = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    literal = [str(p.relative_to(ROOT)) for p in sources if f'"{declared}"' in p.read_text()]
    assert literal == []  # no second copy of the version string in the code
