"""The release files: pyproject.toml says what PyPI needs, the sdist and the
wheel built from it hold the whole package, and `make demo` stays lean.

The build runs without isolation (build, setuptools>=77 and twine come with
the dev extra) on a copy of the source tree in tmp_path: setuptools writes
build/ and *.egg-info next to the sources, and the repository's tree must not
change under the other tests.  scripts/smoke_wheel.sh (run by .ci/run) does
the rest: an isolated build, a fresh venv, the installed command."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

import callcp

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the suite runs on 3.11+ here
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "callcp"
PYTHONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]


def _project() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        data: dict[str, Any] = tomllib.load(f)
    return data


def _modules(tree: Path) -> set[str]:
    """The package's files, as paths in a wheel (callcp/_core/wire.py...)."""
    return {
        path.relative_to(tree.parent).as_posix()
        for path in tree.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


# ------------------------------------------------------------- metadata


def test_metadata_has_what_a_release_needs() -> None:
    data = _project()
    project = data["project"]
    assert data["build-system"]["build-backend"] == "setuptools.build_meta"
    assert project["name"] == "callcp"
    assert project["version"] == callcp.__version__
    assert len(project["description"]) > 20
    assert "\n" not in project["description"]
    assert project["readme"] == {"file": "README.md", "content-type": "text/markdown"}
    assert (ROOT / "README.md").is_file()
    # PEP 639: an SPDX expression; setuptools refuses "License ::" classifiers
    # beside it (and so needs setuptools>=77 to build).
    assert project["license"] == "MIT"
    assert any(
        re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\..*)?", req)
        for req in data["build-system"]["requires"]
    )
    assert project["authors"] and all(a.get("name") for a in project["authors"])
    assert project["keywords"]
    assert project["requires-python"] == ">=3.9"

    classifiers = project["classifiers"]
    assert len(set(classifiers)) == len(classifiers)
    assert not [c for c in classifiers if c.startswith("License ::")]
    for prefix in (
        "Development Status :: ",
        "Intended Audience :: ",
        "Operating System :: POSIX",
        "Topic :: Security :: Cryptography",
    ):
        assert any(c.startswith(prefix) for c in classifiers), prefix
    versions = [
        c.rsplit(" :: ", 1)[1]
        for c in classifiers
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    ]
    assert versions == PYTHONS
    assert project["requires-python"] == f">={versions[0]}"
    assert "Typing :: Typed" in classifiers
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in data["tool"]["setuptools"]["package-data"]["callcp"]

    assert project["scripts"] == {"callcp": "callcp.cli:main"}
    extras = project["optional-dependencies"]
    assert {"display", "bench", "hsm", "dev"} <= set(extras)
    dev = {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0] for req in extras["dev"]}
    assert {"build", "twine", "setuptools", "pytest"} <= dev
    # the runtime dependencies stay the two make demo installs
    assert [re.split(r"[<>=]", d)[0] for d in project["dependencies"]] == [
        "cryptography",
        "bcrypt",
    ]


def test_classifiers_are_known_to_pypi() -> None:
    trove = pytest.importorskip("trove_classifiers")
    unknown = set(_project()["project"]["classifiers"]) - set(trove.classifiers)
    assert not unknown


def test_make_demo_installs_the_runtime_only() -> None:
    if shutil.which("make") is None:
        pytest.skip("no make")

    def commands(target: str) -> str:
        return subprocess.run(
            ["make", "-C", str(ROOT), "-n", "-B", target],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    demo = commands("demo")
    assert "pip install --quiet -e .\n" in demo
    assert "[dev]" not in demo
    assert "examples/demo.py" in demo
    test = commands("test")
    assert 'pip install --quiet -e ".[dev]"' in test
    assert "scripts/system-deps.sh" in test


# ----------------------------------------------------------------- build


def _copy_sources(dest: Path) -> Path:
    skip = {".git", ".venv", "venv", "build", "dist", "tests", "benchmarks"}
    skip |= {".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis"}

    def ignore(directory: str, names: list[str]) -> set[str]:
        top = Path(directory) == ROOT
        return {
            n
            for n in names
            if (top and n in skip) or n == "__pycache__" or n.endswith((".egg-info", ".pyc"))
        }

    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def test_sdist_and_wheel_hold_the_package(tmp_path: Path) -> None:
    pytest.importorskip("build")
    setuptools = pytest.importorskip("setuptools")
    assert int(setuptools.__version__.split(".")[0]) >= 77, (
        f"setuptools {setuptools.__version__} is too old to build callcp: "
        "reinstall the dev extra (make test)"
    )
    src = _copy_sources(tmp_path / "src")
    out = tmp_path / "dist"
    # an sdist, then the wheel from the unpacked sdist: the wheel shows the
    # sdist holds what building needs
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    version = callcp.__version__
    wheel = out / f"callcp-{version}-py3-none-any.whl"
    sdist = out / f"callcp-{version}.tar.gz"
    assert sorted(p.name for p in out.iterdir()) == sorted([sdist.name, wheel.name])

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"callcp-{version}.dist-info"
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        metadata = zf.read(f"{info}/METADATA").decode()
    package = {n for n in names if not n.startswith(info + "/")}
    assert package == _modules(src / "src" / "callcp")
    assert {"callcp/py.typed", "callcp/hsm.py", "callcp/_core/__init__.py"} <= package
    assert "callcp/_core/protocol.py" in package
    assert re.search(r"^\[console_scripts\]\ncallcp = callcp\.cli:main$", entry_points, re.M)
    assert "License-Expression: MIT" in metadata
    assert "Requires-Python: >=3.9" in metadata
    assert "Description-Content-Type: text/markdown" in metadata
    assert "Provides-Extra: hsm" in metadata
    assert "# callcp" in metadata  # the README is the long description

    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    for needed in (
        "PKG-INFO",
        "README.md",
        "pyproject.toml",
        "src/callcp/py.typed",
        "src/callcp/_core/__init__.py",
        "src/callcp/hsm.py",
        "docs/PROTOCOL.md",
    ):
        assert needed in members, needed
    assert not [m for m in members if m.startswith("tests/") or "__pycache__" in m]

    pytest.importorskip("twine")
    checked = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
