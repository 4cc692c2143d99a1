# Tally's entry points. `make help` lists them; README.md explains them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVICES := scripts/services.sh
REDIS_CLUSTER_SH := scripts/redis-cluster.sh
# REDIS_CLUSTER=1: `make services` / `services-down` also start / stop the Redis Cluster
# (3 masters + 3 replicas on 127.0.0.1:17001..17006) beside the single Redis.
REDIS_CLUSTER ?= 0
KAFKA_CLUSTER := scripts/kafka-cluster.sh
# BROKERS=3: the services targets also start/stop/report the three-broker Kafka cluster
# (127.0.0.1:29092-29094, beside the single broker on 9092).
BROKERS ?= 1
CLUSTER_BOOTSTRAP := 127.0.0.1:29092,127.0.0.1:29093,127.0.0.1:29094
PYTEST_ARGS ?=
BENCH_COUNT ?= 200000
BENCH_SECONDS ?= 10
DURATION ?= 300
SEED ?= 1
FUZZ_EXAMPLES ?= 200
FUZZ_HTTP_EXAMPLES ?= 500

.PHONY: help venv services services-down services-status lint fmt test test-unit \
        test-integration test-fault test-cluster test-redis-cluster demo bench chaos \
        chaos-cluster fuzz clean helm

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required, found " + sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(STAMP) ## Create .venv and install the package with its dev tools

# Which Kafka the services targets drive besides PostgreSQL and Redis: 1 = the single broker
# only, 3 = the cluster too. Anything else is a typo, not a silent single broker.
ifeq ($(filter $(BROKERS),1 3),)
$(error BROKERS must be 1 or 3 (got '$(BROKERS)'))
endif
define with_brokers
	@if [ "$(BROKERS)" = 3 ]; then $(KAFKA_CLUSTER) $(1); fi
endef
define with_redis_cluster
	@if [ "$(REDIS_CLUSTER)" = 1 ]; then $(REDIS_CLUSTER_SH) $(1); fi
endef

services: ## Start Kafka (KRaft), PostgreSQL and Redis on loopback (reuses running ones); BROKERS=3 adds the 3-broker Kafka cluster, REDIS_CLUSTER=1 the Redis Cluster
	@$(SERVICES) up
	$(call with_brokers,up)
	$(call with_redis_cluster,up)

services-down: ## Stop the local services started by `make services` (BROKERS=3 / REDIS_CLUSTER=1: the clusters too)
	$(call with_redis_cluster,down)
	$(call with_brokers,down)
	@$(SERVICES) down

services-status: ## Say which local services are up (BROKERS=3 / REDIS_CLUSTER=1: the clusters too)
	@rc=0; $(SERVICES) status || rc=1; \
	if [ "$(BROKERS)" = 3 ]; then $(KAFKA_CLUSTER) status || rc=1; fi; \
	if [ "$(REDIS_CLUSTER)" = 1 ]; then $(REDIS_CLUSTER_SH) status || rc=1; fi; exit $$rc

helm: ## Build the Helm CLI from its Go module into .cache/bin, once (the chart tests render with it)
	@scripts/helm.sh >/dev/null

lint: $(STAMP) ## ruff check, ruff format --check, mypy on the packages
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP) ## Format and auto-fix with ruff
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# pytest exits 5 when it collected nothing; that is a broken suite, not a pass.
define run_pytest
	@set +e; $(PY) -m pytest $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests in $(1): failing" >&2; exit 1; fi; \
	exit $$rc
endef

test: lint services helm ## Lint, start the services, build helm (once), run every test suite against them
	$(call run_pytest,tests/unit tests/integration tests/fault)

test-unit: $(STAMP) helm ## Only the pure, fast unit tests (no services needed)
	$(call run_pytest,-m unit tests/unit)

test-integration: $(STAMP) services ## Only the integration tests (real services)
	$(call run_pytest,-m integration tests/integration)

test-fault: $(STAMP) services ## Only the fault tests (kills and restarts)
	$(call run_pytest,-m fault tests/fault)

# The cluster tests (marked `cluster`), then, against the cluster too, the engine and
# transaction integration tests: every process of the run bootstraps from the three brokers
# and makes its topics with three replicas, min.insync.replicas 2.
CLUSTER_TESTS ?= tests/integration/test_engine.py tests/integration/test_transaction.py \
  tests/integration/test_engine_workers.py tests/integration/test_sinks.py \
  tests/integration/test_ingress.py tests/integration/test_stack_smoke.py \
  tests/integration/test_scratch.py

test-cluster: export TALLY_KAFKA_BOOTSTRAP = $(CLUSTER_BOOTSTRAP)
test-cluster: export TALLY_TOPIC_REPLICATION = 3
test-cluster: export TALLY_TOPIC_MIN_INSYNC_REPLICAS = 2
test-cluster: $(STAMP) ## Start the 3-broker Kafka cluster (+ PostgreSQL, Redis) and run the cluster tests against it
	@$(SERVICES) up
	@$(KAFKA_CLUSTER) up
	$(call run_pytest,-m cluster tests/integration)
	$(call run_pytest,-m integration $(CLUSTER_TESTS))

test-redis-cluster: $(STAMP) ## Start the Redis Cluster (and the services), run its tests: the sink and reads on it, a master's failover
	@$(MAKE) --no-print-directory services REDIS_CLUSTER=1
	$(call run_pytest,tests/integration/test_redis_cluster.py tests/fault/test_redis_failover.py)

# The chaos run on the clusters: three brokers (replication 3, min.insync.replicas 2) and
# the Redis Cluster, so that broker_kill9, broker_sigstop and redis_master_kill9 are drawn.
chaos-cluster: export TALLY_KAFKA_BOOTSTRAP = $(CLUSTER_BOOTSTRAP)
chaos-cluster: export TALLY_TOPIC_REPLICATION = 3
chaos-cluster: export TALLY_TOPIC_MIN_INSYNC_REPLICAS = 2
chaos-cluster: export TALLY_REDIS_CLUSTER = true
chaos-cluster: export TALLY_REDIS_URL = redis://127.0.0.1:17001/0
chaos-cluster: $(STAMP) ## Long chaos run on the 3-broker Kafka cluster and the Redis Cluster, broker and Redis master kills included (DURATION=300 SEED=1)
	@$(MAKE) --no-print-directory services BROKERS=3 REDIS_CLUSTER=1
	$(VENV)/bin/tally chaos --duration $(DURATION) --seed $(SEED)

demo: $(STAMP) services ## Run the main job against the local services and print its summary
	$(VENV)/bin/tally demo

bench: $(STAMP) services ## Run the benchmarks (engine, decide, failover, sinks, HTTP, recovery, replay, audit, reads, notify) and print their numbers
	$(VENV)/bin/tally bench engine --count $(BENCH_COUNT)
	$(VENV)/bin/tally bench decide --count $(BENCH_COUNT)
	$(VENV)/bin/tally bench failover --fault kill --report reports/bench-failover-kill.json
	$(VENV)/bin/tally bench failover --fault term --report reports/bench-failover-term.json
	$(VENV)/bin/tally bench sinks --events $(BENCH_COUNT)
	$(VENV)/bin/tally bench http --duration $(BENCH_SECONDS)
	$(VENV)/bin/tally bench recovery --balances 1000000
	$(VENV)/bin/tally bench replay --events $(BENCH_COUNT)
	$(VENV)/bin/tally bench audit --balances 1000000
	$(VENV)/bin/python -m bench.reads --seconds $(BENCH_SECONDS)
	$(VENV)/bin/tally bench notify --events 20000

chaos: $(STAMP) services ## Long chaos run: faults on a seeded schedule under load, then checks (DURATION=300 SEED=1)
	$(VENV)/bin/tally chaos --duration $(DURATION) --seed $(SEED)

fuzz: export TALLY_FUZZ_EXAMPLES = $(FUZZ_EXAMPLES)
fuzz: $(STAMP) services ## Long fuzz runs, fresh seeds: hostile records at a real worker (FUZZ_EXAMPLES=200), schemathesis at the ingress (FUZZ_HTTP_EXAMPLES=500; FUZZ_SEED=N repeats one)
	$(call run_pytest,tests/fault/test_engine_fuzz.py)
	@seed=$${FUZZ_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; echo "make fuzz: FUZZ_SEED=$$seed"; \
	TALLY_FUZZ_SEED=$$seed TALLY_FUZZ_EXAMPLES=$(FUZZ_HTTP_EXAMPLES) $(PY) -m pytest -m integration tests/integration/test_ingress_fuzz.py $(PYTEST_ARGS)

clean: ## Remove the virtualenv and caches (not the services' data: see services-down)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
