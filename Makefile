# Two commands matter: `make demo` (the whole pipeline on synthetic data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= tf-cpu,cv
DEMO := demo
TEST_WORKERS ?= 2  # pytest-xdist processes; each test file runs whole in one of them (its module fixtures once)

# Keras on JAX and the package's own deps, no TensorFlow (tests/test_device_check.py)
NOTF_VENV ?= .venv-notf
# CPU torch + timm for bench_step.py's timm rows (make bench-peer; not part of make test)
BENCH_VENV ?= .venv-bench

.PHONY: demo demo-easy test lint install install-dev bench bench-peer notf-venv clean-demo browser

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

# The accelerator box the device check is written for has JAX but no TensorFlow: this venv is that box's Python
# (pyproject's dependencies + jax; TensorFlow is only an extra). About a minute from PyPI. If it cannot be built
# (no network), a one-line note; tests/test_device_check.py then skips, saying why.
$(NOTF_VENV)/.installed: pyproject.toml
	rm -rf $(NOTF_VENV)
	{ $(PYTHON) -m venv $(NOTF_VENV) && $(NOTF_VENV)/bin/pip install -q -e ".[jax]" && touch $@; } || \
		{ rm -rf $(NOTF_VENV); echo "note: could not build $(NOTF_VENV); tests/test_device_check.py will be skipped"; }

notf-venv: $(NOTF_VENV)/.installed

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

test: install-dev browser notf-venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

lint: install-dev
	$(VENV)/bin/ruff check .

bench: install-dev
	$(PY) benchmarks/bench_convert.py
	$(PY) benchmarks/bench_pipeline.py

# Keras-TF, Keras-JAX and timm side by side on this CPU (docs/results.md): torch + timm from PyPI in their own venv
# (the Linux wheel brings CUDA libraries, ~5 GB; about a minute), then bench_step.py with --torch-python.
$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q torch timm
	touch $@

bench-peer: install-dev $(BENCH_VENV)/.installed
	nice -n 10 $(PY) benchmarks/bench_step.py --rows keras-tf,keras-jax,timm-eager,timm-compile \
		--torch-python $(BENCH_VENV)/bin/python --no-pipeline
	nice -n 10 $(PY) benchmarks/bench_step.py --backbone efficientnet_b7 --size 128 --batch 2 \
		--rows keras-tf,keras-jax,timm-eager,timm-compile --torch-python $(BENCH_VENV)/bin/python --no-pipeline

clean-demo:
	rm -rf $(DEMO)
