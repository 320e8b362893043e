"""`duoserve env`: the host's defaults and versions, for bug reports."""

from __future__ import annotations

import torch

from duoserve.cli import main
from duoserve.hardware import host_defaults


def test_env_prints_the_startup_line_and_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == host_defaults().describe()
    assert f"torch: {torch.__version__}" in out
    for name in ("python", "duoserve", "transformers", "features", "usable physical cores"):
        assert f"{name}: " in out, name
