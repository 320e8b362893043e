"""The engine process's OpenMP wait policy: a short spin by default, the user's choice kept."""

from __future__ import annotations

import os

import pytest

from duoserve.engine.engine_env import WAIT_VARS, engine_env_defaults, engine_environment


def test_short_spin_by_default():
    assert engine_env_defaults({"PATH": "/bin"}) == {"GOMP_SPINCOUNT": "3000"}


@pytest.mark.parametrize("name", WAIT_VARS)
def test_a_wait_setting_of_the_user_is_kept(name):
    # Any of them: e.g. GOMP_SPINCOUNT=300000 alone restores libgomp's default spinning.
    assert engine_env_defaults({name: "1"}) == {}


def test_environment_is_restored(monkeypatch):
    for name in WAIT_VARS:
        monkeypatch.delenv(name, raising=False)
    with engine_environment() as added:
        assert added == {"GOMP_SPINCOUNT": "3000"}
        assert os.environ["GOMP_SPINCOUNT"] == "3000"
    assert "GOMP_SPINCOUNT" not in os.environ


def test_users_setting_is_left_alone(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with engine_environment() as added:
        assert added == {}
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
