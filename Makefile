# The two README commands: `make dev` runs the pipeline, `make test` runs every test. Each installs what it needs:
# the virtualenv and Python dependencies here, the Kafka broker jars (Maven Central) on first broker start,
# the npm packages of the official-client test, and Debian's postgresql (the warehouse destination's tests start
# their own server from its binaries) when it is missing.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed
NODE_CLIENT := tests/clients/node

.PHONY: dev test install postgres kafka-start kafka-stop bench

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $(INSTALLED)

$(NODE_CLIENT)/node_modules/.package-lock.json: $(NODE_CLIENT)/package-lock.json
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund --loglevel=error

postgres:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
	  sudo=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends postgresql; }

install: $(INSTALLED) $(NODE_CLIENT)/node_modules/.package-lock.json postgres

dev: $(INSTALLED)
	$(VENV)/bin/cdp dev

test: install
	$(VENV)/bin/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

bench: $(INSTALLED)
	$(VENV)/bin/cdp bench ingest --out bench/results/ingest.json
