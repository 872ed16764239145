# Two commands matter: `make demo` (the whole pipeline on synthetic data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= tf-cpu,cv
DEMO := demo

.PHONY: demo test lint install install-dev bench clean-demo

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

install-dev:
	$(MAKE) install EXTRAS=tf-cpu,cv,dev

demo: install
	$(PY) -m ranzcr_tf.demo --out-dir $(DEMO)

test: install-dev
	$(PY) -m pytest -q tests

lint: install-dev
	$(VENV)/bin/ruff check .

bench: install-dev
	$(PY) benchmarks/bench_convert.py
	$(PY) benchmarks/bench_pipeline.py

clean-demo:
	rm -rf $(DEMO)
