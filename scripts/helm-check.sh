#!/usr/bin/env bash
# Offline checks of the Helm chart, for CI and for humans:
#   1. helm lint --strict with each helm/driftserve/ci/*-values.yaml;
#   2. helm template with each of them;
#   3. kubernetes-validate --strict on the output, against the oldest supported and the newest Kubernetes.
#
# kubernetes-validate knows only built-in kinds. Custom resources (RayService, ServiceMonitor, Strimzi's
# Kafka, KafkaNodePool, KafkaTopic) come back as "no schema" warnings: those are accepted for exactly the
# kinds and API versions listed below and fail the check for anything else (a built-in kind with a
# mistyped apiVersion would otherwise slip through as a warning). The pod templates and the Service that
# a RayService embeds are pulled out and validated as a Pod and a Service, so the Ray pods get the same
# strict check as the Deployments.
#
# Environment: HELM_CHECK_OUT=<dir> keeps the rendered manifests there (default: a temporary directory).
# Exit status: 0 when everything passes, 1 otherwise.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
chart="${root}/helm/driftserve"
kube_versions=(1.29.0 1.37.0)   # Chart.yaml kubeVersion floor, and the newest schema kubernetes-validate ships
custom_kinds=(
    "RayService ray.io/v1"
    "ServiceMonitor monitoring.coreos.com/v1"
    "Kafka kafka.strimzi.io/v1beta2" "Kafka kafka.strimzi.io/v1"
    "KafkaNodePool kafka.strimzi.io/v1beta2" "KafkaNodePool kafka.strimzi.io/v1"
    "KafkaTopic kafka.strimzi.io/v1beta2" "KafkaTopic kafka.strimzi.io/v1"
)

helm="$("${root}/scripts/install-helm.sh")"

if [[ -x "${root}/.venv/bin/kubernetes-validate" ]]; then
    kv="${root}/.venv/bin/kubernetes-validate"
    python="${root}/.venv/bin/python"
elif command -v kubernetes-validate >/dev/null; then
    kv="$(command -v kubernetes-validate)"
    python="$(command -v python3)"
else
    echo "helm-check: kubernetes-validate not found; install it with: .venv/bin/pip install kubernetes-validate pyyaml" >&2
    exit 1
fi

out="${HELM_CHECK_OUT:-$(mktemp -d)}"
mkdir -p "${out}"
kv_args=(--strict --quiet)
for v in "${kube_versions[@]}"; do kv_args+=(-k "${v}"); done

# Pods and Services embedded in RayService resources, as standalone objects kubernetes-validate can check.
embedded() {
    "${python}" - "$1" <<'PY'
import sys

import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
objects = []
for doc in docs:
    if doc.get("kind") != "RayService":
        continue
    name = doc["metadata"]["name"]
    cluster = doc["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    for group, spec in groups:
        template = spec["template"]
        objects.append({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {**template.get("metadata", {}), "name": f"{name}-{group}"},
            "spec": template["spec"],
        })
    if "serveService" in doc["spec"]:
        service = doc["spec"]["serveService"]
        objects.append({"apiVersion": "v1", "kind": "Service", **service})
yaml.safe_dump_all(objects, sys.stdout, sort_keys=False)
PY
}

# Fails on kubernetes-validate errors and on "no schema" warnings for kinds not in custom_kinds.
validate() {
    local file="$1" report rc=0
    report="$("${kv}" "${kv_args[@]}" "${file}" 2>&1)" || rc=$?
    local unexpected
    unexpected="$(grep -v -F -f <(for entry in "${custom_kinds[@]}"; do
        read -r kind api <<<"${entry}"
        echo "Couldn't find schema for kind ${kind} with api version ${api} for"
    done) <<<"${report}" || true)"
    if [[ ${rc} -ne 0 || -n "${unexpected}" ]]; then
        echo "${report}" | grep -v '^$' >&2
        return 1
    fi
}

failed=0
shopt -s nullglob
values_files=("${chart}"/ci/*-values.yaml)
if [[ ${#values_files[@]} -eq 0 ]]; then
    echo "helm-check: no ${chart}/ci/*-values.yaml" >&2
    exit 1
fi

for values in "${values_files[@]}"; do
    name="$(basename "${values}" -values.yaml)"
    rendered="${out}/${name}.yaml"
    echo "== ${name}"
    if ! "${helm}" lint --strict "${chart}" -f "${values}" >"${out}/${name}.lint.txt" 2>&1; then
        cat "${out}/${name}.lint.txt" >&2
        echo "FAIL helm lint --strict (${name})" >&2
        failed=1
        continue
    fi
    echo "ok   helm lint --strict"
    if ! "${helm}" template ds-ci "${chart}" --namespace driftserve -f "${values}" >"${rendered}"; then
        echo "FAIL helm template (${name})" >&2
        failed=1
        continue
    fi
    echo "ok   helm template: $(grep -c '^kind:' "${rendered}") objects"
    if validate "${rendered}"; then
        echo "ok   kubernetes-validate --strict (${kube_versions[*]})"
    else
        echo "FAIL kubernetes-validate --strict (${name})" >&2
        failed=1
    fi
    embedded "${rendered}" >"${out}/${name}.embedded.yaml"
    if validate "${out}/${name}.embedded.yaml"; then
        echo "ok   kubernetes-validate --strict on RayService pod templates and serve Service"
    else
        echo "FAIL kubernetes-validate --strict on RayService pod templates (${name})" >&2
        failed=1
    fi
done

echo "rendered manifests: ${out}"
if [[ ${failed} -ne 0 ]]; then
    echo "helm-check: FAILED" >&2
    exit 1
fi
echo "helm-check: all passed"
