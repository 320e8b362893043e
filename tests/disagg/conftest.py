"""Fixtures shared by the disaggregation tests."""

import pytest
import zmq


@pytest.fixture
def zmq_context():
    context = zmq.Context()
    yield context
    context.term()
