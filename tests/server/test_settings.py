"""The server's settings from the command line and the environment: the cluster secret."""

from __future__ import annotations

from duoserve.cli import build_parser
from duoserve.server.settings import settings_from_args


def test_cluster_secret_from_the_environment_or_the_flag(monkeypatch):
    monkeypatch.delenv("DUOSERVE_CLUSTER_SECRET", raising=False)
    assert settings_from_args(build_parser().parse_args(["serve"])).cluster_secret is None
    monkeypatch.setenv("DUOSERVE_CLUSTER_SECRET", "from-env")
    for command in ("serve", "router", "up"):
        args = build_parser().parse_args([command])
        assert settings_from_args(args).cluster_secret == "from-env"
    args = build_parser().parse_args(["router", "--cluster-secret", "flag"])
    assert settings_from_args(args).cluster_secret == "flag"
    monkeypatch.setenv("DUOSERVE_CLUSTER_SECRET", "")  # set but empty: none
    assert settings_from_args(build_parser().parse_args(["serve"])).cluster_secret is None
