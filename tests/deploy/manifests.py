"""Rendering deploy/kubernetes with kustomize, and finding things in what it renders (tests/deploy)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("colocated", "disaggregated")
# The oldest release whose schema has preStop's `sleep` action (on by default since 1.30), and the newest
# that kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
PORTS = {"http": 8000, "kv": 5600, "kv-events": 5601}
SECRET_ENV = {"DUOSERVE_API_KEY": "api-key", "DUOSERVE_CLUSTER_SECRET": "cluster-secret"}
ROLE_LABEL = "duoserve.io/role"
VERBS = ["get", "list", "watch"]


def kustomize(directory: Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kustomize_with(tmp_path: Path, overlay: str, components: list[str]) -> list[dict]:
    """An overlay plus components, through a kustomization outside the repository (kustomize wants
    relative paths to other kustomizations)."""
    relative = os.path.relpath(KUBE, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [f"{relative}/overlays/{overlay}"],
                "components": [f"{relative}/components/{c}" for c in components],
            }
        )
    )
    return kustomize(tmp_path)


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


def main_container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def flag(container: dict, name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{name}=")]
    return value


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def workers(objects: list[dict]) -> list[dict]:
    return [d for d in of_kind(objects, "Deployment") if ROLE_LABEL in pod_labels(d)]


def router(objects: list[dict]) -> dict:
    return named(objects, "Deployment", "duoserve-router")
