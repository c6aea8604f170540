# Set-up is part of every target: the virtual environment is created from
# nothing when missing (with the pinned versions of constraints.txt) and
# reused otherwise.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The offline defaults (no downloads, Ray on loopback without auth, ...) come from
# OFFLINE_ENV in platform/insight/runtime.py, the list tests and benchmarks use too.
# A variable already set wins: `HF_HUB_OFFLINE=0 make demo` lets backbone.kind=auto
# fetch ViT-B-16.
OFFLINE_ENV := $(shell PYTHONPATH=$(CURDIR)/platform $(PYTHON) -m insight.runtime)
$(foreach kv,$(OFFLINE_ENV),$(eval $(subst =, ?= ,$(kv))))
export $(foreach kv,$(OFFLINE_ENV),$(firstword $(subst =, ,$(kv))))
export PYTHONUNBUFFERED := 1

.PHONY: venv test demo lint format bench clean browser postgresql cluster-up cluster-down test-cluster

# The browser tests drive Debian's chromium through the playwright package
# (`playwright install` cannot download browsers here). CI runs as root on a
# fresh machine that reaches the package registries only.
CHROMIUM ?= /usr/bin/chromium

$(STAMP): pyproject.toml constraints.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e . -r requirements-dev.txt
	@touch $(STAMP)

venv: $(STAMP)

browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: $(STAMP) browser
	$(PY) -m pytest -q tests

# The production topology on this machine (docs/cluster.md): PostgreSQL (Debian's,
# installed here when missing), moto's S3 server, an MLflow server on both and a
# 3-node Ray cluster, all on 127.0.0.1. cluster-down stops exactly what cluster-up started.
postgresql:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }

cluster-up: $(STAMP) postgresql
	@bash scripts/cluster-up.sh $(VENV)

cluster-down: $(STAMP)
	@bash scripts/cluster-down.sh $(VENV)

# Brings the topology up from nothing, runs the pipeline on it up to a served champion, loses
# nodes, restarts MLflow; installs postgresql and chromium when missing.
test-cluster: $(STAMP) browser postgresql
	$(PY) -m pytest -q -m cluster tests/test_cluster_topology.py

demo: $(STAMP)
	@bash scripts/demo.sh $(VENV)

lint: $(STAMP)
	$(VENV)/bin/ruff check platform tests bench jobs serve

format: $(STAMP)
	$(VENV)/bin/ruff format platform tests bench jobs serve

clean:
	rm -rf outputs .pytest_cache
