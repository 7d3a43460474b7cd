# The two commands of the README. Both set everything up first (scripts/setup.sh).
PYTHON ?= python3
export PYTHON

.PHONY: setup quickstart test test-all

setup:
	@bash scripts/setup.sh

# The headline comparison: MU-SplitFed, SplitFed (ZO and first-order) and GAS on one straggler
# scenario; figure and table in runs/quickstart/report/. Re-running reuses finished runs.
quickstart: setup
	$(PYTHON) -m simulator compare scenarios/quickstart.yaml --out runs/quickstart --report

test: setup
	$(PYTHON) -m pytest

test-all: setup
	$(PYTHON) -m pytest -m ""
