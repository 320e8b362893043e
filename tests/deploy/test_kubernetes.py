"""deploy/kubernetes, offline: both overlays render, every core object passes kubernetes-validate --strict,
the ScaledObjects pass KEDA's vendored CRD schema, and the rendered objects say what the README promises
(probes, draining, Guaranteed QoS, non-root, secrets, RBAC, NetworkPolicy, consistent selectors)."""

from __future__ import annotations

import argparse
import copy
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.manifests import (
    KUBE,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    PORTS,
    ROLE_LABEL,
    ROOT,
    SECRET_ENV,
    VERBS,
    env_of,
    flag,
    kustomize,
    kustomize_with,
    main_container,
    named,
    of_kind,
    pod_labels,
    router,
    workers,
)
from tests.deploy.network_policy import Endpoint, allowed, ingress_allows, selects


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, kustomize(KUBE / "overlays" / request.param)


# ------------------------------------------------------------------------------------------ schemas


def test_overlays_render_the_expected_objects(rendered):
    overlay, objects = rendered
    roles = {"colocated": {"both"}, "disaggregated": {"prefill", "decode"}}[overlay]
    assert {pod_labels(d)[ROLE_LABEL] for d in workers(objects)} == roles
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"} <= kinds
    assert {"PodDisruptionBudget", "NetworkPolicy", "ScaledObject", "PersistentVolumeClaim"} <= kinds
    assert len(of_kind(objects, "ScaledObject")) == len(roles)
    # Everything lands in one namespace; no Secret is shipped (the README says how to create it).
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"duoserve"}
    assert not of_kind(objects, "Secret")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_pass_kubernetes_validate_strict(rendered, version):
    _, objects = rendered
    core = [o for o in objects if "keda.sh" not in o["apiVersion"]]
    assert core
    for obj in core:
        kubernetes_validate.validate(obj, version, strict=True)


def test_kubernetes_validate_strict_rejects_an_unknown_field(rendered):
    """The check above can fail: a misspelt field in a Deployment is an error under --strict."""
    _, objects = rendered
    broken = copy.deepcopy(router(objects))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health"}}
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def _strict(schema):
    """The CRD's structural schema with unknown fields rejected, as `kubectl apply --validate=strict`."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def scaledobject_schema() -> dict:
    crd = yaml.safe_load((KUBE / "schemas" / "keda.sh_scaledobjects.yaml").read_text())
    assert crd["spec"]["group"] == "keda.sh" and crd["spec"]["names"]["kind"] == "ScaledObject"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def test_scaledobjects_pass_the_vendored_keda_schema(rendered, scaledobject_schema):
    _, objects = rendered
    for scaled in of_kind(objects, "ScaledObject"):
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.validate(scaled, scaledobject_schema)


def test_the_keda_schema_rejects_a_bad_scaledobject(rendered, scaledobject_schema):
    """KEDA's trigger metadata is a map of strings: a threshold written as a YAML number is refused."""
    _, objects = rendered
    broken = copy.deepcopy(of_kind(objects, "ScaledObject")[0])
    broken["spec"]["triggers"][0]["metadata"]["threshold"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, scaledobject_schema)
    misspelt = copy.deepcopy(of_kind(objects, "ScaledObject")[0])
    misspelt["spec"]["minReplicas"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(misspelt, scaledobject_schema)


# ----------------------------------------------------------------------------------- pods


def test_probes_readiness_on_health_liveness_on_livez(rendered):
    _, objects = rendered
    for deployment in of_kind(objects, "Deployment"):
        container = main_container(deployment)
        port_names = {p["name"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] in port_names, (deployment["metadata"]["name"], probe)
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    for worker in workers(objects):
        # Started = model loaded (/health's 200), with minutes of budget for the kernel build and load.
        startup = main_container(worker)["startupProbe"]
        assert startup["httpGet"]["path"] == "/health"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    # The router is alive long before it is ready (a worker of every role): started on /livez.
    assert main_container(router(objects))["startupProbe"]["httpGet"]["path"] == "/livez"


def test_grace_period_covers_prestop_and_the_drain(rendered):
    _, objects = rendered
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        container = main_container(deployment)
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        shutdown = float(flag(container, "shutdown-timeout"))
        assert pre_stop > 0
        name = deployment["metadata"]["name"]
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + shutdown + 10, name


def test_requests_equal_limits_guaranteed_qos(rendered):
    _, objects = rendered
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            resources = container["resources"]
            assert set(resources["limits"]) >= {"cpu", "memory"}, container["name"]
            assert resources["requests"] == resources["limits"], container["name"]


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", quantity)
    assert match, quantity
    return int(match[1]) * units.get(match[2] or "", 1)


def test_threads_follow_the_cpu_limit_and_the_kv_cache_fits_the_memory_limit(rendered):
    _, objects = rendered
    for deployment in of_kind(objects, "Deployment"):
        container = main_container(deployment)
        env = env_of(container)
        for name in ("CPU_LIMIT", "OMP_NUM_THREADS"):
            field = env[name]["valueFrom"]["resourceFieldRef"]
            assert field["resource"] == "limits.cpu" and field["divisor"] == "1"
    for worker in workers(objects):
        container = main_container(worker)
        assert flag(container, "num-threads") == "$(CPU_LIMIT)"
        assert flag(container, "kv-cache-memory") == "$(KV_CACHE_MEMORY)"
        kv_bytes = int(env_of(container)["KV_CACHE_MEMORY"]["value"])
        limit = _bytes(container["resources"]["limits"]["memory"])
        assert 0 < kv_bytes <= limit // 2, worker["metadata"]["name"]  # weights and activations need the rest


def test_every_variable_in_args_is_defined(rendered):
    """Kubernetes leaves an undefined $(VAR) in args as is: duoserve would get the literal text."""
    _, objects = rendered
    for deployment in of_kind(objects, "Deployment"):
        container = main_container(deployment)
        used = {m for arg in container["args"] for m in re.findall(r"\$\(([A-Z_]+)\)", arg)}
        assert used <= set(env_of(container)), deployment["metadata"]["name"]


def test_non_root_read_only_and_writable_paths_are_volumes(rendered):
    _, objects = rendered
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        volumes = {v["name"] for v in pod["volumes"]}
        for container in pod.get("initContainers", []) + pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
        container = main_container(deployment)
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        writable = [path for path, m in mounts.items() if not m.get("readOnly")]
        assert "/tmp" in writable  # the API and engine processes' ZeroMQ ipc sockets
        env = env_of(container)
        for variable in ("XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR"):
            if variable in env:
                path = env[variable]["value"]
                assert any(path == w or path.startswith(w + "/") for w in writable), path


def test_the_kernel_cache_is_seeded_from_the_image(rendered):
    """The init container copies the Containerfile's TORCH_EXTENSIONS_DIR into the directory the worker
    sets as its own TORCH_EXTENSIONS_DIR."""
    containerfile = (ROOT / "Containerfile").read_text()
    (baked,) = re.findall(r"TORCH_EXTENSIONS_DIR=(\S+)", containerfile)
    _, objects = rendered
    for worker in workers(objects):
        pod = worker["spec"]["template"]["spec"]
        (seed,) = [c for c in pod["initContainers"] if c["name"] == "seed-kernel-cache"]
        target = env_of(main_container(worker))["TORCH_EXTENSIONS_DIR"]["value"]
        assert f"cp -a {baked}/. {target}/" in seed["command"][-1]
        assert seed["image"] == main_container(worker)["image"]


def test_secrets_come_from_a_secret(rendered):
    _, objects = rendered
    for deployment in of_kind(objects, "Deployment"):
        env = env_of(main_container(deployment))
        for name, key in SECRET_ENV.items():
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "duoserve-secrets", "key": key}
        assert "--api-key" not in " ".join(main_container(deployment)["args"])  # `ps` would show it


def test_images_are_pinned_and_the_same_everywhere(rendered):
    _, objects = rendered
    images = set()
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        images |= {c["image"] for c in pod.get("initContainers", []) + pod["containers"]}
    (image,) = images
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and "/" not in tag


def test_config_map_references_resolve(rendered):
    _, objects = rendered
    config_maps = {c["metadata"]["name"]: c["data"] for c in of_kind(objects, "ConfigMap")}
    for deployment in of_kind(objects, "Deployment"):
        for variable in env_of(main_container(deployment)).values():
            ref = variable.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in config_maps[ref["name"]]


# ----------------------------------------------------------------------- workers and the router


def test_worker_role_comes_from_its_label_and_it_advertises_its_pod_ip(rendered):
    _, objects = rendered
    for worker in workers(objects):
        container = main_container(worker)
        env = env_of(container)
        assert flag(container, "role") == "$(WORKER_ROLE)"
        assert env["WORKER_ROLE"]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['{ROLE_LABEL}']"
        assert flag(container, "advertise-host") == "$(POD_IP)"
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert flag(container, "host") == "0.0.0.0"
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == PORTS
        assert int(flag(container, "port")) == PORTS["http"]
        assert int(flag(container, "kv-port")) == PORTS["kv"]
        assert int(flag(container, "kv-events-port")) == PORTS["kv-events"]
        assert worker["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
        assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_worker_services_are_headless_labelled_for_discovery_and_match_their_pods(rendered):
    _, objects = rendered
    deployments = of_kind(objects, "Deployment")
    for service in of_kind(objects, "Service"):
        selector = {"matchLabels": service["spec"]["selector"]}
        (target,) = [d for d in deployments if selects(selector, pod_labels(d))]
        labels = pod_labels(target)
        assert service["spec"]["ports"][0]["name"] == "http"
        if ROLE_LABEL in labels:
            # --discover k8s selects EndpointSlices by this label, copied from the Service.
            assert service["metadata"]["labels"][ROLE_LABEL] == labels[ROLE_LABEL]
            assert service["spec"]["clusterIP"] == "None"
            assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == PORTS
        else:
            assert ROLE_LABEL not in service["metadata"]["labels"]  # the router's own Service is no worker


def test_selectors_are_consistent(rendered):
    """Every Deployment's selector matches its own pods only; PDBs and ScaledObjects target one each."""
    _, objects = rendered
    deployments = of_kind(objects, "Deployment")
    for deployment in deployments:
        selector = deployment["spec"]["selector"]
        matching = [d for d in deployments if selects(selector, pod_labels(d))]
        assert matching == [deployment]
        labels, own = pod_labels(deployment), deployment["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == labels["app.kubernetes.io/part-of"] == "duoserve"
        assert labels["app.kubernetes.io/component"] == own["app.kubernetes.io/component"]
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        matching = [d for d in deployments if selects(pdb["spec"]["selector"], pod_labels(d))]
        assert [d["metadata"]["name"] for d in matching] == [pdb["metadata"]["name"]]
        assert pdb["spec"]["maxUnavailable"] == 1
    assert len(of_kind(objects, "PodDisruptionBudget")) == len(deployments)
    targets = [s["spec"]["scaleTargetRef"] for s in of_kind(objects, "ScaledObject")]
    assert sorted(t["name"] for t in targets) == sorted(d["metadata"]["name"] for d in workers(objects))
    assert all(t["kind"] == "Deployment" and t["apiVersion"] == "apps/v1" for t in targets)
    # An applied `replicas` would reset the autoscaler's count on every `kubectl apply`.
    assert all("replicas" not in d["spec"] for d in workers(objects))


def test_router_discovers_through_the_kubernetes_api_with_read_only_rbac(rendered):
    _, objects = rendered
    deployment = router(objects)
    assert "--discover=k8s" in main_container(deployment)["args"]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    named(objects, "ServiceAccount", account)
    (binding,) = of_kind(objects, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "duoserve"}]
    role = named(objects, "Role", binding["roleRef"]["name"])
    assert binding["roleRef"]["kind"] == "Role"
    (rule,) = role["rules"]
    assert rule == {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": VERBS}
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")


def _flags_known_to(command: str) -> set[str]:
    from duoserve.cli import build_parser

    (subcommands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(subcommands.choices[command]._option_string_actions)


def test_args_parse_with_duoserves_own_command_line(rendered):
    """The manifests' args, with the downward API's values filled in, are accepted by `duoserve`."""
    from duoserve.cli import build_parser

    _, objects = rendered
    for deployment in of_kind(objects, "Deployment"):
        container = main_container(deployment)
        command = container["args"][0]
        flags = {a.split("=")[0] for a in container["args"] if a.startswith("--")}
        missing = sorted(flags - _flags_known_to(command))
        if missing:
            pytest.skip(f"`duoserve {command}` lacks {missing} (issue 12's discovery branch adds them)")
        values = {"POD_IP": "10.0.0.7", "CPU_LIMIT": "4", "WORKER_ROLE": "decode"}
        values |= {name: e["value"] for name, e in env_of(container).items() if "value" in e}
        values |= {"MODEL_FILE": "model.gguf", "SERVED_MODEL_NAME": "model"}
        args = [re.sub(r"\$\(([A-Z_]+)\)", lambda m, v=values: v[m[1]], a) for a in container["args"]]
        parsed = build_parser().parse_args(args)
        assert parsed.port == 8000


# ------------------------------------------------------------------------------ NetworkPolicy


def _pods(objects: list[dict]) -> dict[str, Endpoint]:
    pods = {}
    for deployment in of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        ports = {p["name"]: p["containerPort"] for p in main_container(deployment)["ports"]}
        pods[labels.get(ROLE_LABEL, "router")] = Endpoint(labels, ports=ports)
    return pods


def test_network_policy(rendered):
    overlay, objects = rendered
    policies = of_kind(objects, "NetworkPolicy")
    pods = _pods(objects)
    client = Endpoint({"app": "some-client"}, namespace="apps")
    stranger = Endpoint({"app": "curious"})  # another pod in duoserve's namespace
    prometheus = Endpoint({"app.kubernetes.io/name": "prometheus"}, namespace="monitoring")
    api_server = Endpoint({}, is_pod=False)
    dns = Endpoint({"k8s-app": "kube-dns"}, namespace="kube-system", ports={"dns": 53})
    worker_roles = [r for r in pods if r != "router"]

    assert allowed(policies, client, pods["router"], PORTS["http"])
    assert allowed(policies, pods["router"], api_server, 443)
    for role in worker_roles:
        worker = pods[role]
        assert allowed(policies, pods["router"], worker, PORTS["http"])
        assert allowed(policies, pods["router"], worker, PORTS["kv-events"])
        assert not allowed(policies, pods["router"], worker, PORTS["kv"])
        assert not allowed(policies, client, worker, PORTS["http"])
        assert not allowed(policies, stranger, worker, PORTS["http"])
        assert not allowed(policies, stranger, worker, PORTS["kv"])
        assert allowed(policies, prometheus, worker, PORTS["http"])
        assert not allowed(policies, prometheus, worker, PORTS["kv"])
        assert not allowed(policies, worker, api_server, 443)
        assert not allowed(policies, worker, client, 80)
        assert allowed(policies, worker, dns, 53)
    # Each side enforces on its own (a pod's ingress does not rely on the other pods' egress policies).
    for role in worker_roles:
        assert not ingress_allows(policies, stranger, pods[role], PORTS["http"])
        assert not ingress_allows(policies, pods["router"], pods[role], PORTS["kv"])
        for other in worker_roles:
            if other != "prefill":
                assert not ingress_allows(policies, pods[other], pods[role], PORTS["kv"])
    if overlay == "disaggregated":
        assert allowed(policies, pods["prefill"], pods["decode"], PORTS["kv"])
        assert not allowed(policies, pods["decode"], pods["prefill"], PORTS["kv"])
        assert not allowed(policies, pods["prefill"], pods["decode"], PORTS["http"])
        assert not allowed(policies, pods["decode"], pods["prefill"], PORTS["http"])
    else:
        assert not allowed(policies, pods["both"], pods["both"], PORTS["kv"])


# ------------------------------------------------------------------------------ components


def test_components_render_and_validate(tmp_path, scaledobject_schema):
    objects = kustomize_with(tmp_path, "disaggregated", ["model-in-image", "hpa"])
    assert not of_kind(objects, "ScaledObject") and not of_kind(objects, "PersistentVolumeClaim")
    hpas = of_kind(objects, "HorizontalPodAutoscaler")
    targets = sorted(h["spec"]["scaleTargetRef"]["name"] for h in hpas)
    assert targets == ["duoserve-decode", "duoserve-prefill"]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[0], strict=True)
    containerfile = (ROOT / "Containerfile").read_text()
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
        assert "emptyDir" in models and "persistentVolumeClaim" not in models
        (copy_model,) = [c for c in pod["initContainers"] if c["name"] == "copy-model"]
        assert "/opt/duoserve/models/" in copy_model["command"][-1]
    assert "/opt/duoserve/models" in containerfile

    planned = kustomize_with(tmp_path, "disaggregated", ["planner"])
    for scaled in of_kind(planned, "ScaledObject"):
        jsonschema.validate(scaled, scaledobject_schema)
        (trigger,) = scaled["spec"]["triggers"]
        role = scaled["spec"]["scaleTargetRef"]["name"].removeprefix("duoserve-")
        wanted = f'duoserve:planner_desired_replicas{{namespace="duoserve",role="{role}"}}'
        assert wanted in trigger["metadata"]["query"]
        assert scaled["spec"]["minReplicaCount"] == 1


def test_cuda_component_gives_each_worker_a_gpu(tmp_path):
    objects = kustomize_with(tmp_path, "disaggregated", ["cuda"])
    for obj in objects:
        if "keda.sh" not in obj["apiVersion"]:
            kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[0], strict=True)
    for worker in workers(objects):
        container = main_container(worker)
        assert "--device=cuda" in container["args"]
        assert container["resources"]["requests"] == container["resources"]["limits"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in main_container(router(objects))["resources"]["limits"]


def test_scaledobjects_scale_each_role_on_its_own_signal(rendered):
    overlay, objects = rendered
    queries = {
        s["spec"]["scaleTargetRef"]["name"]: [t["metadata"]["query"] for t in s["spec"]["triggers"]]
        for s in of_kind(objects, "ScaledObject")
    }
    for scaled in of_kind(objects, "ScaledObject"):
        spec = scaled["spec"]
        assert spec["minReplicaCount"] == 1 and spec["maxReplicaCount"] > 1
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] > 0
        assert all(t["type"] == "prometheus" for t in spec["triggers"])
    if overlay == "disaggregated":
        assert "duoserve:router_queued_prefill_tokens" in queries["duoserve-prefill"][0]
        assert queries["duoserve-decode"] == [
            'sum(duoserve:num_requests_waiting{namespace="duoserve",role="decode"})',
            'avg(duoserve:kv_cache_usage_perc{namespace="duoserve",role="decode"})',
        ]
    else:
        assert queries["duoserve-worker"] == [
            'sum(duoserve:num_requests_waiting{namespace="duoserve",role="both"})',
            'avg(duoserve:kv_cache_usage_perc{namespace="duoserve",role="both"})',
        ]


def test_the_prometheus_scrape_job_sets_the_labels_the_queries_use():
    (job,) = yaml.safe_load((KUBE / "monitoring" / "prometheus-scrape.yaml").read_text())
    targets = {r.get("target_label"): r["source_labels"] for r in job["relabel_configs"]}
    assert targets["role"] == ["__meta_kubernetes_pod_label_duoserve_io_role"]
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]
    assert job["authorization"]["type"] == "Bearer"  # /metrics needs the API key
