#!/usr/bin/env bash
# The Ray head in compose: starts the head node in the foreground and, beside it, deploys the Serve
# app from serve_apps/config.yaml. The GCS keeps Serve's state in memory, so a restarted head comes
# back without the app; deploying here on every start (rather than from a one-shot service) is what
# brings it back. `serve deploy` is declarative: deploying the same config again changes nothing.
#
# Every value comes from the same environment variables as core/settings.py, with its defaults,
# so the script also runs outside a container (ports moved, SERVE_HOST=127.0.0.1).
set -euo pipefail

: "${RAY_AUTH_TOKEN:?RAY_AUTH_TOKEN is not set: the head refuses to start without token authentication}"
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED=0
# Serve's HTTP proxy listens on every interface of the container (compose's network only: no port
# of this container is published); the rendered config takes host and port from the settings.
export SERVE_HOST="${SERVE_HOST:-0.0.0.0}"

gcs_port="${RAY_GCS_PORT:-6380}"
# Clients elsewhere set RAY_DASHBOARD_HOST to the head's name; here it is what the dashboard binds.
dashboard_host="${RAY_DASHBOARD_HOST:-0.0.0.0}"
dashboard_port="${RAY_DASHBOARD_PORT:-8265}"
dashboard="http://127.0.0.1:${dashboard_port}"
deploy_timeout_s="${SERVE_DEPLOY_TIMEOUT_S:-300}"

log() {
    printf '{"time":"%s","level":"%s","service":"ray-head","logger":"head.sh","message":"%s"}\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%S.000Z)" "$1" "$2" >&2
}

stop_head() {
    log ERROR "$1; stopping the head so that compose restarts it"
    kill -TERM "$head_pid"
}

deploy_serve() {
    local deadline=$((SECONDS + deploy_timeout_s))
    until python -c "import urllib.request as u; u.urlopen('${dashboard}/api/gcs_healthz', timeout=2)" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            stop_head "the dashboard did not answer within ${deploy_timeout_s}s"
            return 1
        fi
        sleep 2
    done
    # As `cluster up` does (cluster.apps.deploy_serve): the config rendered with this container's
    # host, port and tracing, `serve deploy` retried until the dashboard's Serve module takes it,
    # then a wait until the application runs.
    if ! python -m cluster deploy-serve >&2; then
        stop_head "the Serve app did not deploy"
        return 1
    fi
}

# $$ is this shell, which `exec` below turns into `ray start`.
head_pid=$$
deploy_serve &

args=(
    --head --block --disable-usage-stats
    --port "$gcs_port"
    --dashboard-host "$dashboard_host"
    --dashboard-port "$dashboard_port"
    --ray-client-server-port "${RAY_CLIENT_PORT:-10001}"
    --dashboard-agent-listen-port "${RAY_DASHBOARD_AGENT_PORT:-52365}"
    --metrics-export-port "${RAY_METRICS_EXPORT_PORT:-8090}"
)
if [[ -n "${RAY_NUM_CPUS:-}" ]]; then
    args+=(--num-cpus "$RAY_NUM_CPUS")
fi
if [[ -n "${RAY_TEMP_DIR:-}" ]]; then
    args+=(--temp-dir "$RAY_TEMP_DIR")
fi
exec ray start "${args[@]}"
