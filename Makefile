# Two commands do all set-up (see README.md):
#   make lab    create/update .venv with the pinned versions, then start JupyterLab on notebooks/
#   make test   the same set-up, then every unit test and every notebook under nbval
# Both are idempotent: pip runs again only when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flaxtrain-installed
PYTEST_ARGS ?=

.PHONY: lab test unit notebooks bench site setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "flaxtrain needs Python 3.11 or newer; $(PYTHON) is %d.%d" % sys.version_info[:2])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[notebooks,test,docs]"
	$(BIN)/python -m ipykernel install --sys-prefix --name flaxtrain --display-name "Python (flaxtrain)" >/dev/null
	@touch $(STAMP)

# Bound to localhost with token authentication on. Jupyter refuses to run as root unless told to;
# containers often run as root, so the flag is added only then. tests/test_browser.py starts this
# same target on a copy of the notebooks (LAB_DIR) with its own port and token (LAB_FLAGS).
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
LAB_DIR ?= notebooks
LAB_FLAGS ?=
lab: $(STAMP)
	JUPYTER_CONFIG_PATH="$(CURDIR)/tools/jupyter$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" $(BIN)/jupyter lab --notebook-dir="$(LAB_DIR)" --ServerApp.ip=127.0.0.1 --MappingKernelManager.default_kernel_name=flaxtrain $(ALLOW_ROOT) $(LAB_FLAGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# Re-execute notebooks in place (all, or NB="notebooks/03_*.ipynb").
NB ?= notebooks/[0-9]*.ipynb
notebooks: $(STAMP)
	$(BIN)/python tools/notebooks.py execute $(NB)

# The benchmarks compare ft.fit with Keras 3 (benchmarks/keras_peer.py): the [bench] extra is installed
# here only, never by `make setup`; flaxtrain does not depend on it.
BENCH_STAMP := $(VENV)/.flaxtrain-bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[bench]"
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py

# The website: README, stored notebooks (never executed) and API reference, built by Sphinx from
# docs/conf.py with warnings as errors, from scratch each time (-E: an incremental build would not
# repeat the warnings of the pages it skips). Open $(SITE_DIR)/html/index.html; tests/test_site.py builds
# it into a temporary SITE_DIR.
SITE_DIR ?= build/site
site: $(STAMP)
	$(BIN)/python -m sphinx -b html -c docs -d "$(SITE_DIR)/doctrees" -E -W --keep-going -q . "$(SITE_DIR)/html"
	@echo "site: $(SITE_DIR)/html/index.html"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
