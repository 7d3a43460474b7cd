# The two commands of the README. Both set everything up first (scripts/setup.sh).
PYTHON ?= python3
export PYTHON

.PHONY: setup quickstart test test-all

setup:
	@bash scripts/setup.sh

quickstart: setup
	$(PYTHON) -m simulator run scenarios/quickstart.yaml --out runs/quickstart

test: setup
	$(PYTHON) -m pytest

test-all: setup
	$(PYTHON) -m pytest -m ""
