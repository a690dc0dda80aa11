# Every target depends on what it needs: on a fresh clone `make local` and
# `make test` each work as the first command.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# ORT=gpu installs onnxruntime-gpu instead of onnxruntime.
ORT ?= cpu
STAMP := $(VENV)/.installed-$(ORT)
# make deploy-aws and the aws-* targets need only the serving core and boto3
# (no torch): on a fresh clone they install '.[deploy]'; in a tree where
# `make build` already ran they use that environment.
DEPLOY_STAMP := $(VENV)/.installed-deploy
DEPLOY_ENV := $(if $(wildcard $(STAMP)),$(STAMP),$(DEPLOY_STAMP))
# Everything a developer needs: ONNX Runtime, training, datasets, plots, AWS, tests.
EXTRAS := $(ORT),train,data,report,deploy,dev
BUILD_INPUTS := pyproject.toml setup.py $(wildcard protos/parm/*/*.proto) \
	$(wildcard coding_ext/*.pyx coding_ext/*.pxi coding_ext/*.pxd coding_ext/*.h)
# CONFIG: a config file, or its bare name (fig9a-local = configs/fig9a-local.json) for
# every target that takes one. NETWORK overrides the config's network: auto (the
# namespace testbed where this machine can make it, rootless, else emulated; what
# configs/local.json asks for), emulated or netns.
CONFIG ?= configs/local.json
ARTIFACTS ?= artifacts

.PHONY: build test test-fast local serve calibrate models bench deploy-aws aws-status aws-results aws-terminate chaos clean \
	image kubernetes-render kubernetes-smoke

build: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

$(DEPLOY_STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[deploy]'
	touch $@

# The whole suite (CI).
test: build
	$(PY) -m pytest

# The edit loop: everything but the slow end-to-end tests.
test-fast: build
	$(PY) -m pytest -m "not slow"

models: build
	$(PY) -m models.build --out $(ARTIFACTS)

local: build
	$(PY) -m deploy.runner.local $(CONFIG) $(if $(NETWORK),--network $(NETWORK),)

serve: build
	$(PY) -m deploy.runner.serve $(CONFIG)

# Fit the emulated network to the namespace testbed (writes configs/emulation-calibrated.json).
calibrate: build
	$(PY) -m deploy.network.calibrate $(CALIBRATE_ARGS)

bench: build
	$(PY) -m coding_ext.bench --json results/bench/coding_ext.json
	$(PY) -m services.coder.bench --json results/bench/coder.json
	$(PY) -m services.frontend.bench --json results/bench/frontend.json
	$(PY) -m services.frontend.coding_bench --json results/bench/frontend_coding.json

deploy-aws: $(DEPLOY_ENV)
	$(PY) -m deploy.aws launch $(CONFIG) $(if $(DRY_RUN),--dry-run,) $(if $(KEEP_RUNNING),--keep-running,) $(AWS_ARGS)

aws-status: $(DEPLOY_ENV)
	$(PY) -m deploy.aws status $(if $(filter-out configs/local.json,$(CONFIG)),$(CONFIG),) $(AWS_ARGS)

aws-results: $(DEPLOY_ENV)
	$(PY) -m deploy.aws results $(CONFIG) $(AWS_ARGS)

aws-terminate: $(DEPLOY_ENV)
	$(PY) -m deploy.aws terminate $(CONFIG) $(if $(STOP),--stop,) $(if $(CLEANUP),--cleanup,) $(AWS_ARGS)

chaos: build
	$(PY) -m deploy.reliability.chaos

# Kubernetes (docs/kubernetes.md). IMAGE names the image `make image` builds
# (podman, no registry needed); VALUES is a render values file.
IMAGE ?= localhost/parm:0.1.0
VALUES ?= kubernetes/overlays/cpu-k2-coded/values.json

image: build
	IMAGE=$(IMAGE) PY=$(PY) kubernetes/build-image.sh

kubernetes-render: build
	$(PY) kubernetes/render.py $(VALUES)

kubernetes-smoke: image
	$(PY) -m pytest tests/kubernetes -p no:cacheprovider

clean:
	rm -rf build parm *.egg-info .pytest_cache .hypothesis
	find . -name '__pycache__' -prune -exec rm -rf {} +
	find coding_ext -name '*.so' -delete
