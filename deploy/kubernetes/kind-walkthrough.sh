#!/usr/bin/env bash
# duoserve on a local kind cluster, end to end: build the image, install an overlay, send requests, scale,
# drain a worker under load, tear down. For readers with Docker, kind and kubectl; not run in CI (no
# container runtime there: tests/deploy checks the same manifests offline, and what this script would
# install through RENDER_ONLY=1).
#
#   deploy/kubernetes/kind-walkthrough.sh                    # disaggregated: router + prefill + decode
#   OVERLAY=colocated deploy/kubernetes/kind-walkthrough.sh  # router + colocated workers
#   KEEP=1 deploy/kubernetes/kind-walkthrough.sh             # leave the cluster running afterwards
#   RENDER_ONLY=1 deploy/kubernetes/kind-walkthrough.sh      # print the manifests it would apply, and stop
#   WITH_KEDA=1 ...   # also install KEDA (from its GitHub release) and keep the ScaledObjects; they only
#                     # act once a Prometheus scrapes the pods (monitoring/prometheus-scrape.yaml)
#
# The walkthrough uses the model baked into the image (components/model-in-image, the default SmolLM2
# GGUF) and shrinks every pod to 1 CPU so that it fits a laptop; kind's nodes share the host's CPU, so the
# kernel the image build compiled is the one the pods load.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root: the image's build context

overlay=${OVERLAY:-disaggregated}
cluster=${CLUSTER:-duoserve}
image=duoserve:0.1.0
keda_version=v2.20.2  # the version of the vendored CRD schema (deploy/kubernetes/schemas)
namespace=duoserve

step() { printf '\n== %s\n' "$*" >&2; }

# The kustomization the walkthrough installs: the overlay, the model from the image, laptop-sized pods
# (requests still equal limits), one router, and no ScaledObjects unless KEDA is installed.
write_kustomization() {
  local work=$1 kube
  kube=$(realpath --relative-to="$work" deploy/kubernetes)
  cat >"$work/kustomization.yaml" <<EOF
resources: [$kube/overlays/$overlay]
components: [$kube/components/model-in-image]
patches:
  - target: {kind: Deployment, labelSelector: duoserve.io/role}
    patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata: {name: any}
      spec:
        template:
          spec:
            containers:
              - name: duoserve
                env: [{name: KV_CACHE_MEMORY, value: "536870912"}]
                resources: {requests: {cpu: "1", memory: 3Gi}, limits: {cpu: "1", memory: 3Gi}}
  - target: {kind: Deployment, name: duoserve-router}
    patch: |-
      - {op: replace, path: /spec/replicas, value: 1}
EOF
  if [[ -z "${WITH_KEDA:-}" ]]; then
    cat >>"$work/kustomization.yaml" <<'EOF'
  - target: {group: keda.sh, kind: ScaledObject}
    patch: |-
      {$patch: delete, apiVersion: keda.sh/v1alpha1, kind: ScaledObject, metadata: {name: any}}
EOF
  fi
}

work=$(mktemp -d)
forward=
cleanup() {
  [[ -n "$forward" ]] && kill "$forward" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
write_kustomization "$work"
if [[ -n "${RENDER_ONLY:-}" ]]; then
  kubectl kustomize "$work"
  exit 0
fi

for tool in docker kind kubectl curl openssl; do
  command -v "$tool" >/dev/null || { echo "needs $tool on PATH" >&2; exit 1; }
done

step "cluster and image"
kind get clusters | grep -qx "$cluster" || kind create cluster --name "$cluster" --wait 120s
docker build -f Containerfile -t "$image" .
kind load docker-image "$image" --name "$cluster"
kubectl config use-context "kind-$cluster"

if [[ -n "${WITH_KEDA:-}" ]]; then
  step "KEDA $keda_version"
  kubectl apply --server-side \
    -f "https://github.com/kedacore/keda/releases/download/$keda_version/keda-${keda_version#v}.yaml"
  kubectl -n keda rollout status deployment/keda-operator --timeout 300s
fi

step "secrets (random, never committed)"
kubectl get namespace "$namespace" >/dev/null 2>&1 || kubectl create namespace "$namespace"
kubectl -n "$namespace" get secret duoserve-secrets >/dev/null 2>&1 ||
  kubectl -n "$namespace" create secret generic duoserve-secrets \
    --from-literal=api-key="$(openssl rand -hex 32)" \
    --from-literal=cluster-secret="$(openssl rand -hex 32)"
api_key=$(kubectl -n "$namespace" get secret duoserve-secrets -o jsonpath='{.data.api-key}' | base64 -d)

step "install: the $overlay overlay, the model from the image, 1 CPU per pod"
kubectl apply -k "$work"
for deployment in $(kubectl -n "$namespace" get deployments -o name); do
  # Workers: the startup probe allows minutes (model load, and the kernel build on another CPU).
  kubectl -n "$namespace" rollout status "$deployment" --timeout 600s
done
kubectl -n "$namespace" get pods -o wide

step "requests through the router"
kubectl -n "$namespace" port-forward service/duoserve-router 8000:8000 >/dev/null &
forward=$!
for _ in $(seq 30); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
auth=(-H "Authorization: Bearer $api_key")
curl -s "${auth[@]}" localhost:8000/v1/models; echo
curl -s "${auth[@]}" localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}'
echo

step "observe: the router's view of its workers and the queued prefill tokens"
curl -s "${auth[@]}" localhost:8000/metrics | grep -E '^duoserve:router_(ready_workers|queued_prefill_tokens)'

step "scale: a second worker of the decoding role joins once Ready"
decode=decode
[[ "$overlay" == colocated ]] && decode=worker
if [[ -n "${WITH_KEDA:-}" ]]; then  # KEDA owns the replicas: pin them through it
  kubectl -n "$namespace" annotate --overwrite "scaledobject/duoserve-$decode" \
    autoscaling.keda.sh/paused-replicas=2
  sleep 5
else
  kubectl -n "$namespace" scale "deployment/duoserve-$decode" --replicas 2
fi
kubectl -n "$namespace" rollout status "deployment/duoserve-$decode" --timeout 600s
sleep 3  # the router's EndpointSlice watch
curl -s "${auth[@]}" localhost:8000/metrics | grep -E '^duoserve:router_ready_workers'

step "drain: delete a decoding pod while 8 requests stream; every one should complete"
pids=()
for i in $(seq 8); do
  curl -s "${auth[@]}" localhost:8000/v1/completions -H 'Content-Type: application/json' \
    -d "{\"prompt\": \"Count to $((i + 20)):\", \"max_tokens\": 64}" -o "$work/out-$i.json" &
  pids+=($!)
done
sleep 1
victim=$(kubectl -n "$namespace" get pods -l "app.kubernetes.io/component=$decode" -o name | head -1)
kubectl -n "$namespace" delete "$victim" --wait=false
failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}" || ! grep -q '"finish_reason"' "$work/out-$((i + 1)).json"; then
    failed=$((failed + 1))
  fi
done
echo "requests that failed during the drain: $failed"
kubectl -n "$namespace" get pods

if [[ -z "${KEEP:-}" ]]; then
  step "tear down"
  kind delete cluster --name "$cluster"
else
  echo "cluster kind-$cluster left running (kubectl config use-context kind-$cluster)"
fi
