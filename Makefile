# Two commands matter: `make demo` (the whole pipeline on synthetic data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= tf-cpu,cv
DEMO := demo
TEST_WORKERS ?= 2  # pytest-xdist processes; each test file runs whole in one of them (its module fixtures once)

.PHONY: demo demo-easy test lint install install-dev bench clean-demo browser

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

install-dev:
	$(MAKE) install EXTRAS=tf-cpu,cv,dicom,dev

# The hard phantoms (thin, faint, crowded lines) with the preset chosen on both styles (configs/cpu_lines.yaml).
demo: install
	$(PY) -m ranzcr_tf.demo --out-dir $(DEMO)

# The same preset on the easy phantoms (thick bright tubes).
demo-easy: install
	$(PY) -m ranzcr_tf.demo --style easy --out-dir $(DEMO)_easy

# Headless Chromium for the run report's browser test (tests/test_report.py skips, saying why, without it).
# Debian's package, installed quietly when apt is usable (root); otherwise a one-line note.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } || \
		echo "note: could not install chromium (needs apt as root); the report's browser test will be skipped"

test: install-dev browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

lint: install-dev
	$(VENV)/bin/ruff check .

bench: install-dev
	$(PY) benchmarks/bench_convert.py
	$(PY) benchmarks/bench_pipeline.py

clean-demo:
	rm -rf $(DEMO)
