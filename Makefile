# EdgeFleet developer entry points. Everything runs from the project's own virtualenv.
#   make test          venv + Mosquitto, then the whole pytest suite
#   make lint          ruff check, ruff format --check, mypy (strict on protocol/)
#   make demo          the end-to-end demo (DEMO_ARGS="..." passes options through)
#   make models        retrain the shipped demo model into models/digits/
#   make test-arm64    the agent in an arm64 Debian userland under qemu (root; docs/arm64.md)
#   make clean         caches and build outputs (distclean also removes .venv)
#   make bench         every benchmark in quick mode, one summary table (BENCH_ARGS=--full)

PYTHON ?= python3
VENV ?= .venv
VENV_PY := $(VENV)/bin/python
# Re-install only when the dependency list changes.
VENV_STAMP := $(VENV)/.edgefleet-deps-stamp
PYTEST_ARGS ?=
DEMO_ARGS ?=
MODEL_ARGS ?=

.DEFAULT_GOAL := test
.PHONY: venv mosquitto postgres test lint format demo models clean distclean

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	@test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu install python3-venv" >&2; exit 1; }
	$(VENV_PY) -m pip install --upgrade pip
	$(VENV_PY) -m pip install -e '.[dev]'
	@touch $@

mosquitto:
	@scripts/ensure-mosquitto.sh

postgres:
	@scripts/ensure-postgres.sh >/dev/null

# pytest exits 5 when it collected no tests: make already fails on it, and we say why.
test: venv mosquitto
	@$(VENV_PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "error: pytest ran no tests (exit 5)" >&2; fi; \
	  exit $$rc

# The agent on arm64 (Raspberry Pi / Jetson userland) under qemu-user; needs root. The rootfs
# and venv are cached outside the repo (EDGEFLEET_ARM64_CACHE). ARM64_ARGS=--smoke runs the
# reduced check; other ARM64_ARGS go to pytest. A missing prerequisite prints SKIPPED and
# exits 0 (non-zero with EDGEFLEET_REQUIRE_ARM64=1). See docs/arm64.md.
.PHONY: test-arm64
ARM64_ARGS ?=
test-arm64: venv mosquitto
	@scripts/arm64/test.sh $(ARM64_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy protocol/

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: venv mosquitto
	$(VENV_PY) -m edgefleet.demo $(DEMO_ARGS)

# torch is pinned: an unpinned one may resolve to a newer multi-GB CUDA build.
models: venv
	$(VENV_PY) -m pip install -e '.[models]'
	$(VENV_PY) models/train_digits.py $(MODEL_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache test-artifacts demo-out
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# Every benchmarks/*.py (quick mode unless BENCH_ARGS=--full), each with a timeout, then ONE
# table: benchmarks/results/SUMMARY.md and summary.json (machine, figures, baselines, goals).
# BENCH_ARGS="--only scale --timeout-s 1800" or "--summary-only" pass through.
.PHONY: bench
BENCH_ARGS ?=
bench: venv mosquitto
	$(VENV_PY) benchmarks/run_all.py $(BENCH_ARGS)
