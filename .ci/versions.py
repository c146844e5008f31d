"""Print the versions a test pass runs on, and check them.

Run with the environment's own interpreter, from the repository:
  python .ci/versions.py                          the versions of the packages that matter
  python .ci/versions.py --require "pandas>=3"    fail unless the environment has them
  python .ci/versions.py --at-lower-bounds        fail unless each dependency of the project
                                                  (and its extras) with a lower bound in
                                                  pyproject.toml is installed at exactly that
                                                  bound (test-oldest; the dev group's tools
                                                  are left out: users never install them)
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
SHOWN = [
    "numpy", "pandas", "scipy", "statsmodels", "lifelines", "opendp", "formulaic", "grpcio",
    "protobuf", "pydantic", "fastapi", "starlette", "uvicorn", "cryptography", "sqlalchemy",
    "typer",
]  # fmt: skip


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def direct_requirements() -> list[Requirement]:
    """What `pip install alliance[...]` asks for, as pyproject.toml states it."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project.get("optional-dependencies", {}).values()
    specs = [*project["dependencies"], *(spec for extra in extras for spec in extra)]
    return [Requirement(spec) for spec in specs]


def lower_bound_problems() -> list[str]:
    problems = []
    for requirement in direct_requirements():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        bounds = [s.version for s in requirement.specifier if s.operator == ">="]
        version = installed(requirement.name)
        if not bounds or version is None:
            continue
        if Version(version) != Version(bounds[0]):
            problems.append(
                f"pyproject.toml: {requirement} but the oldest pass has {requirement.name} "
                f"{version}: raise the bound to what installs and works, or find what pulls "
                f"it up (uv pip tree)"
            )
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--require", action="append", default=[], metavar="SPEC")
    parser.add_argument("--at-lower-bounds", action="store_true")
    args = parser.parse_args()
    versions = ", ".join(f"{name} {installed(name) or '-'}" for name in SHOWN)
    print(f"==> Python {sys.version.split()[0]}: {versions}")
    problems = []
    for spec in args.require:
        requirement = Requirement(spec)
        version = installed(requirement.name)
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"this pass must run on {spec}, but it has {version or 'none'}")
    if args.at_lower_bounds:
        problems += lower_bound_problems()
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
