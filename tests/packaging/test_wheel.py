"""The production path: the project's wheel, installed into a fresh virtualenv, works outside the
checkout — its command line, its configuration and the definition files it ships.

The editable install the developers use reads every file from the checkout, so a data file missing
from `[tool.setuptools.package-data]` goes unnoticed there; here it fails. The wheel is built from
a copy of the working tree (a `build/` directory left in the checkout by an earlier build would
otherwise smuggle in files the package-data no longer names), and the virtualenv sees nothing of
the checkout or of the developers' virtualenv.

Dependencies come from a wheelhouse in the machine's cache (`~/.cache/cdc-projector/wheels`, beside
the stack's jars), filled from PyPI the first time and whenever the dependencies change; after
that the test needs no network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.settings import StackSettings
from projector.read_models.definitions import load_read_models

pytestmark = pytest.mark.packaging

CHECKOUT = Path(__file__).resolve().parents[2]
# Not part of the source a wheel is built from: local state, caches, earlier builds.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".stack",
    ".stack-tests",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "env.sh",
)
BUILD_REQUIREMENTS = ["setuptools>=68", "wheel"]  # pyproject's [build-system] requires

# Run by the installed interpreter from a directory outside the checkout: everything a deployed
# projector reads at start-up, and where it was read from.
CHECK_INSTALLED = """
import json, sys
from importlib import resources
from pathlib import Path
import connectors, devstack, projector, queries, schemas
from projector.config import load_config
from projector.read_models.definitions import DEFINITIONS_FILE, load_read_models
from schemas.upcasters import DEFAULT_FILE, Upcasters

config = load_config()
print(json.dumps({
    "packages": [m.__file__ for m in (connectors, devstack, projector, queries, schemas)],
    "backend": config.backend,
    "read_models": [m.name for m in load_read_models(None)],
    "read_models_file": str(DEFINITIONS_FILE),
    "upcasters_file": str(DEFAULT_FILE) if DEFAULT_FILE.is_file() else None,
    "upcasters": len(Upcasters.load(None).by_table),
    "connector_template": (resources.files("connectors") / "postgres-source.json").is_file(),
    "maven_poms": sorted(p.name for p in (resources.files("devstack") / "maven").iterdir()),
}))
"""


def pip(
    python: Path | str, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def offline(wheelhouse: Path) -> list[str]:
    return ["--no-index", "--find-links", str(wheelhouse)]


def build_wheel(source: Path, dist: Path, wheelhouse: Path) -> Path:
    """The project's wheel, built as `pip wheel` builds it (isolated build environment); the build
    requirements come from the wheelhouse, fetched into it once."""
    command = ["wheel", str(source), "--no-deps", "-w", str(dist), "-q"]
    built = pip(sys.executable, *command, *offline(wheelhouse))
    if built.returncode != 0:
        fetched = pip(sys.executable, "download", "-q", "-d", str(wheelhouse), *BUILD_REQUIREMENTS)
        assert fetched.returncode == 0, fetched.stderr
        built = pip(sys.executable, *command, *offline(wheelhouse))
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("cdc_projector-*.whl")
    return wheel


def install(python: Path, wheel: Path, wheelhouse: Path) -> None:
    """The wheel and its declared dependencies into the virtualenv of `python` (by this pip: a
    virtualenv without pip of its own is made in a second, with one in half a minute); dependencies
    the wheelhouse lacks are downloaded into it first."""
    command = ["--python", str(python), "install", "-q", "--no-compile", str(wheel)]
    installed = pip(sys.executable, *command, *offline(wheelhouse))
    if installed.returncode != 0:
        fetched = pip(sys.executable, "download", "-q", "-d", str(wheelhouse), str(wheel))
        assert fetched.returncode == 0, fetched.stderr
        for copy in wheelhouse.glob("cdc_projector-*.whl"):
            copy.unlink()  # only dependencies live there
        installed = pip(sys.executable, *command, *offline(wheelhouse))
    assert installed.returncode == 0, installed.stderr


def test_the_wheel_installed_in_a_fresh_virtualenv_runs_outside_the_checkout(
    tmp_path: Path,
) -> None:
    wheelhouse = StackSettings().cache_dir / "wheels"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    source = tmp_path / "source"
    shutil.copytree(CHECKOUT, source, ignore=NOT_SOURCE)
    wheel = build_wheel(source, tmp_path / "dist", wheelhouse)

    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300
    )
    python, projector = venv / "bin" / "python", venv / "bin" / "projector"
    install(python, wheel, wheelhouse)

    elsewhere = tmp_path / "elsewhere"  # no checkout, no .stack/ here
    elsewhere.mkdir()
    # Bytecode is written on first import (the install compiles nothing: most of the dependencies'
    # modules are never imported here). No setting of ours: the defaults, as on a new machine.
    unwanted = (
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "PYTHONDONTWRITEBYTECODE",
        "KAFKA_BOOTSTRAP",
        "REGISTRY_URL",
    )
    env = {
        k: v for k, v in os.environ.items() if k not in unwanted and not k.startswith("PROJECTOR_")
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    for command in ([], ["stack"], ["run"]):
        shown = subprocess.run(
            [str(projector), *command, "--help"],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shown.returncode == 0, (command, shown.stderr)
        assert "Usage: projector" in shown.stdout, (command, shown.stdout)

    checked = subprocess.run(
        [str(python), "-c", CHECK_INSTALLED],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr
    found = json.loads(checked.stdout)
    site = str(venv)
    assert all(path.startswith(site) for path in found["packages"]), found["packages"]
    assert found["backend"] == "chdb"
    assert found["read_models_file"].startswith(site)
    # The shipped definitions, the same as the checkout's.
    assert found["read_models"] == [m.name for m in load_read_models(None)]
    assert found["upcasters_file"] is not None and found["upcasters_file"].startswith(site)
    assert found["connector_template"]
    assert found["maven_poms"] == sorted(
        p.name for p in (CHECKOUT / "devstack" / "maven").glob("*.xml")
    )
