# The two commands a new user needs: `make demo` and `make test`.  Both begin with `make setup`.
DURATION ?= 180
ODL := .venv/bin/odl
PYTEST_ARGS ?=

.PHONY: setup demo test test-quick down clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(ODL) demo --duration $(DURATION)

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)

test-quick: setup
	.venv/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

down:
	$(ODL) down

clean: down
	rm -rf var
