#!/usr/bin/env bash
# Run a command in a private network namespace where only loopback exists, so nothing it starts (Ray in
# particular) can reach or bind any other address. Needs root (or user namespaces); falls back to running
# the command directly, on loopback settings, when namespaces are not available.
set -euo pipefail
if [ "${DRIFTSERVE_NO_NETNS:-0}" != "1" ] && command -v unshare >/dev/null 2>&1 && unshare --net true 2>/dev/null; then
  exec unshare --net -- bash -c 'ip link set lo up && exec "$@"' netns "$@"
fi
echo "netns.sh: network namespaces unavailable; running on the host (all services bind 127.0.0.1)" >&2
exec "$@"
