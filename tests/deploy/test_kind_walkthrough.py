"""deploy/kubernetes/kind-walkthrough.sh needs Docker and kind, so CI never runs it; what it would
install (RENDER_ONLY=1) is checked here like the overlays themselves."""

from __future__ import annotations

import os
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from tests.deploy.manifests import KUBE, KUBERNETES_VERSIONS, env_of, main_container, of_kind, workers

SCRIPT = KUBE / "kind-walkthrough.sh"


@pytest.mark.parametrize("overlay", ["colocated", "disaggregated"])
def test_walkthrough_installs_valid_laptop_sized_manifests(overlay):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**os.environ, "RENDER_ONLY": "1", "OVERLAY": overlay},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[0], strict=True)
    assert not of_kind(objects, "ScaledObject") and not of_kind(objects, "PersistentVolumeClaim")
    for worker in workers(objects):
        container = main_container(worker)
        assert container["resources"]["requests"] == container["resources"]["limits"]
        assert container["resources"]["limits"]["cpu"] == "1"
        assert env_of(container)["KV_CACHE_MEMORY"]["value"] == str(512 * 2**20)
