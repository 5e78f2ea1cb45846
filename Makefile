# armpipe: the two commands of the README, plus helpers.
#   make demo [TASK=lift|stack|sort]   set up, then run the whole pipeline under supervisord (CPU demo)
#   make demo CONFIG=my.yaml           the same with a deployment config of one's own (robot, server,
#                                      robot-sim and status take CONFIG too; its task is the config's)
#   make demo POLICY=smolvla           the demo with a tiny untrained SmolVLA, pi0 or pi05 (a language policy;
#                                      POLICY=pi0, POLICY=pi05) instead of the tiny DiffusionPolicy
#   make test                          set up, then run the test suite
TASK ?= lift
CONFIG ?=
POLICY ?=
SHELL := /bin/bash

.PHONY: setup demo robot robot-sim server stop status test lint bench-transport

setup:
	@bash .ci/setup

demo: setup
	@POLICY=$(POLICY) bash .ci/demo $(TASK) $(CONFIG)

robot: setup
	@bash .ci/supervise robot $(TASK) $(CONFIG)

robot-sim: setup
	@bash .ci/supervise robot-sim $(TASK) $(CONFIG)

server: setup
	@bash .ci/supervise server $(TASK) $(CONFIG)

stop:
	@bash .ci/stop

status:
	@.venv/bin/python -m common.tools.status --config $(or $(CONFIG),configs/$(TASK).yaml)$(if $(ARMPIPE_SUPERVISOR_PORT), --supervisor-url http://127.0.0.1:$(ARMPIPE_SUPERVISOR_PORT)/RPC2)

test: setup
	@.venv/bin/ruff check .
	@.venv/bin/mypy
	@.venv/bin/python -m pytest -q

lint: setup
	@.venv/bin/ruff check .
	@.venv/bin/mypy

bench-transport: setup
	@.venv/bin/python -m bench.transport --markdown /tmp/bench-transport.md
