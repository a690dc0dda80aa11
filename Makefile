# Every target depends on what it needs: on a fresh clone `make local` and
# `make test` each work as the first command.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# ORT=gpu installs onnxruntime-gpu instead of onnxruntime.
ORT ?= cpu
STAMP := $(VENV)/.installed-$(ORT)
BUILD_INPUTS := pyproject.toml setup.py $(wildcard protos/parm/*/*.proto) \
	$(wildcard coding_ext/*.pyx coding_ext/*.pxi coding_ext/*.pxd coding_ext/*.h)
CONFIG ?= configs/local.json
ARTIFACTS ?= artifacts

.PHONY: build build-deploy test local serve models bench deploy-aws aws-status aws-results aws-terminate chaos clean

build: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[$(ORT),train,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

test: build
	$(PY) -m pytest

models: build
	$(PY) -m models.build --out $(ARTIFACTS)

local: build
	$(PY) -m deploy.runner.local $(CONFIG) $(if $(NETWORK),--network $(NETWORK),)

serve: build
	$(PY) -m deploy.runner.serve $(CONFIG)

bench: build
	$(PY) -m coding_ext.bench --json results/bench/coding_ext.json
	$(PY) -m services.frontend.bench --json results/bench/frontend.json

# The AWS launcher needs the core and the `deploy` extra only (boto3, cryptography): no torch.
# (A venv that `make build` made already has everything; this adds what is missing.)
DEPLOY_STAMP := $(VENV)/.deploy-installed
build-deploy: $(DEPLOY_STAMP)

$(DEPLOY_STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[deploy]'
	touch $@

deploy-aws: build-deploy
	$(PY) -m deploy.aws launch $(CONFIG) $(if $(DRY_RUN),--dry-run,) $(if $(KEEP_RUNNING),--keep-running,) $(AWS_ARGS)

aws-status: build-deploy
	$(PY) -m deploy.aws status $(if $(filter-out configs/local.json,$(CONFIG)),$(CONFIG),) $(AWS_ARGS)

aws-results: build-deploy
	$(PY) -m deploy.aws results $(CONFIG) $(AWS_ARGS)

aws-terminate: build-deploy
	$(PY) -m deploy.aws terminate $(CONFIG) $(if $(STOP),--stop,) $(if $(CLEANUP),--cleanup,) $(AWS_ARGS)

chaos: build
	$(PY) -m deploy.reliability.chaos

clean:
	rm -rf build parm *.egg-info .pytest_cache .hypothesis
	find . -name '__pycache__' -prune -exec rm -rf {} +
	find coding_ext -name '*.so' -delete
