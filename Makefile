# Quick start: `make run` serves on :32002, `make test` runs the tests (SQLite and PostgreSQL).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test migrate lint clean

$(STAMP): requirements.txt requirements-dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/trainingmgr serve --demo

migrate: install
	$(VENV)/bin/trainingmgr db upgrade

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) data .pytest_cache
