# labkit: the two commands a newcomer types are `make lab` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8888
LAB_FLAGS ?=
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
export LABKIT_PROFILE ?= local
# the Dask sidebar's "+NEW" starts a labkit cluster with the active profile (labkit.cluster.sidebar)
export DASK_LABEXTENSION__FACTORY__MODULE ?= labkit.cluster.sidebar
export DASK_LABEXTENSION__FACTORY__CLASS ?= LabkitCluster

.PHONY: lab test setup system slurm-up slurm-down bench previews clean

## make lab: set up the environment and open JupyterLab on notebooks/ (local Dask cluster)
lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --ServerApp.ip=127.0.0.1 --port=$(PORT) $(ROOT_FLAG) $(LAB_FLAGS)

## make test: set up everything (apt packages, Slurm, Python env) and run the whole suite
test: system setup slurm-up
	$(PY) -m pytest

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	touch $@

system:
	scripts/install-system.sh

## make slurm-up: one-node Slurm on this host plus SLURM_NODES compute hosts in namespaces (0: the host alone)
SLURM_NODES ?= 2
slurm-up:
	scripts/local-slurm.sh up --nodes $(SLURM_NODES)

slurm-down:
	scripts/local-slurm.sh down

## make bench: list the benchmarks and their commands; make bench BENCH=--all runs every one
## (many minutes; bench.cluster needs Slurm), make bench BENCH="attention prune" runs some
BENCH ?=
bench: setup
	$(PY) -m bench $(BENCH)

## make previews: run every notebook at binder scale on one CPU and keep an HTML copy of each in
## docs/preview/ (what an instructor reads without running anything; about 15 minutes)
previews: setup
	rm -rf runs/previews
	$(PY) -m bench.binder --html --output runs/previews
	mkdir -p docs/preview && rm -f docs/preview/[0-9]*.html && cp runs/previews/[0-9]*.html docs/preview/

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
