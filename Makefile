# The two README commands: `make dev` runs the pipeline, `make test` runs every test. Each installs what it needs:
# the virtualenv and Python dependencies here, the Kafka broker jars (Maven Central) on first broker start,
# and the npm packages of the official-client test.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed
NODE_CLIENT := tests/clients/node

.PHONY: dev test install kafka-start kafka-stop bench

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $(INSTALLED)

$(NODE_CLIENT)/node_modules/.package-lock.json: $(NODE_CLIENT)/package-lock.json
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund --loglevel=error

install: $(INSTALLED) $(NODE_CLIENT)/node_modules/.package-lock.json

dev: $(INSTALLED)
	$(VENV)/bin/cdp dev

test: install
	$(VENV)/bin/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

bench: $(INSTALLED)
	$(VENV)/bin/cdp bench ingest --out bench/results/ingest.json
