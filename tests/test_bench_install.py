"""``kvsched bench epp`` from a regular (non-editable) install, run inside a source checkout.

A real install: the checkout is built into a private target directory by pip (no deps, no
index, the machine's shared installation untouched), and its ``kvsched`` console script runs
with the working directory at an unbuilt copy of the source tree. The bench's helper
processes must import the installed package, not the source tree in the working directory
(which has no compiled extensions).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _copy_checkout(destination: Path) -> None:
    """The tracked files, plus the build caches an in-place build leaves (compile time)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = REPO / os.fsdecode(name)
        if source.is_file():
            target = destination / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    if (REPO / "build").is_dir():
        shutil.copytree(REPO / "build", destination / "build", symlinks=True)
    for generated in (REPO / "kernels").glob("*.c"):
        shutil.copy2(generated, destination / "kernels" / generated.name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(target directory of a non-editable install, an unbuilt checkout of the same source)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout to copy")
    root = tmp_path_factory.mktemp("install")
    checkout, target = root / "checkout", root / "site"
    _copy_checkout(checkout)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(checkout),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    # pip built out of tree (build/lib): the checkout's own package stays unbuilt.
    assert not list((checkout / "scheduler" / "_native").glob("*.so"))
    assert list((target / "scheduler" / "_native").glob("*.so"))
    return target, checkout


def test_bench_epp_from_a_regular_install_runs_inside_the_source_checkout(
    installed: tuple[Path, Path],
) -> None:
    target, checkout = installed
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [
            str(target / "bin" / "kvsched"),
            "bench",
            "epp",
            "--rate",
            "0",
            "--requests",
            "12",
            "--concurrency",
            "2",
            "--workers",
            "2",
            "--prompt-tokens",
            "64",
            "--no-floors",
            "--json",
        ],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["requests"] == 12
    assert set(report["cpu_ms_per_request"]) >= {"kvsched", "workers", "envoy"}
