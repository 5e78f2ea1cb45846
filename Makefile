# armpipe: the two commands of the README, plus helpers.
#   make demo [TASK=lift|stack|sort]   set up, then run the whole pipeline under supervisord (CPU demo)
#   make test                          set up, then run the test suite
TASK ?= lift
SHELL := /bin/bash

.PHONY: setup demo robot robot-sim server stop status test lint bench-transport

setup:
	@bash .ci/setup

demo: setup
	@bash .ci/demo $(TASK)

robot: setup
	@bash .ci/supervise robot $(TASK)

robot-sim: setup
	@bash .ci/supervise robot-sim $(TASK)

server: setup
	@bash .ci/supervise server $(TASK)

stop:
	@bash .ci/stop

status:
	@.venv/bin/python -m common.tools.status --config configs/$(TASK).yaml

test: setup
	@.venv/bin/ruff check .
	@.venv/bin/mypy
	@.venv/bin/python -m pytest -q

lint: setup
	@.venv/bin/ruff check .
	@.venv/bin/mypy

bench-transport: setup
	@.venv/bin/python -m bench.transport --markdown /tmp/bench-transport.md
