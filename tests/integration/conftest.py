"""Fixtures the integration tests share: moto's S3 server (one a module), and the store a
proxy points at, SQLite or S3."""

from __future__ import annotations

import pytest

from tests.harness import MotoS3


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "s3"])
def store_env(request) -> dict[str, str]:
    """The environment that points a proxy at the shared store."""
    if request.param == "sqlite":
        return {}
    moto = request.getfixturevalue("moto")
    return moto.env(moto.bucket())
