"""Shared test fixtures: paths to the read-only data in ../shared, and the ext_proc transports."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.adapters.extproc.native import native_available

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present beside the checkout")
    return SHARED


# Every ext_proc test runs against both transports: the grpcio one, and the gRPC C++ one where
# this checkout was built with it (setup.py builds it when pkg-config finds libgrpc++).
EXTPROC_TRANSPORTS = [
    "python",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(
            not native_available(), reason="scheduler._native.extproc not built (no libgrpc++ at build time)"
        ),
    ),
]


@pytest.fixture(params=EXTPROC_TRANSPORTS)
def extproc_transport(request: pytest.FixtureRequest) -> str:
    transport: str = request.param
    return transport
