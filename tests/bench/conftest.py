from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.bench.fake_server import FakeServer


@pytest.fixture
def server() -> Iterator[FakeServer]:
    """A fresh streaming server per test; tests tune its timings before sending requests."""
    srv = FakeServer()
    srv.start()
    yield srv
    srv.stop()
