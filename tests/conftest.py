"""Fixtures shared by the in-process lifecycle tests."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.config import Config
from proxy.lifecycle.demand import Lifecycle
from proxy.store.sqlite import SqliteStore
from proxy.upstream.session import Sessions
from tests.doubles import fake_ollama


@pytest.fixture
def upstream():
    """A fake Ollama in this process, listing llama3.2."""
    server = fake_ollama.start_in_thread(models="llama3.2")
    yield server
    server.close()


@pytest.fixture
def make(tmp_path):
    """make(provisioner, **settings): a Lifecycle, as one gunicorn worker has, on one store.

    Several made in one test behave as several workers (own connection, sync loop, reconciler).
    """
    made = []

    def make(provisioner, **settings) -> Lifecycle:
        config = Config(
            state_dir=tmp_path, tick=0.02, lease_ttl=1.0, idle_timeout=60, retry_base=0.5,
            models=("llama3.2",),
        )
        config = dataclasses.replace(config, **settings)
        life = Lifecycle(config, provisioner, SqliteStore(tmp_path / "state.db"), Sessions(4))
        made.append(life)
        return life

    yield make
    for life in made:
        life.close(timeout=5)


@pytest.fixture
def tls_upstream(tmp_path):
    """(a fake Ollama over TLS that wants the token t0k3n, its certificate's PEM)."""
    from tests.unit.upstream.test_session import NAME, make_cert

    cert, key = make_cert(tmp_path, NAME, "server")
    server = fake_ollama.start_in_thread(models="llama3.2", token="t0k3n", tls_cert=cert,
                                         tls_key=key)
    yield server, open(cert).read()
    server.close()
