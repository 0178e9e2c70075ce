# The two commands: `make demo` runs the main job on the embedded defaults, `make test` runs the tests.
# Both create (or reuse) a local virtual environment and install exactly what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test test-slow test-all sysdeps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip

# torch is pinned to the CPU build for the parity tests; it is installed first so that nothing pulls a CUDA build.
$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test,tfds,aot]"
	touch $@ $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

# bubblewrap gives the sandbox OS-level isolation; without it (no root, no apt) the sandbox's "auto" backend
# falls back to its process backend with a logged warning (RETOOL_SANDBOX_BACKEND=bwrap refuses instead).
sysdeps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
	      || echo "note: could not install bubblewrap; the sandbox falls back to its process backend (not isolated)"; \
	  else echo "note: bubblewrap not installed; the sandbox uses its process backend, not isolated (see README)"; fi; }

demo: sysdeps $(VENV)/.installed
	$(PY) -m retool_jax.demo

test: sysdeps $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -rs --durations=15

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -rs -m slow --durations=15

test-all: $(VENV)/.installed-test
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) runs .pytest_cache
