# kftune: `make run` and `make test` are the whole set-up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_ROWS ?= 3000
MODEL ?= kftune-demo
# pytest-xdist workers for `make test`: as many as kftune would give torch threads (usable cores, cgroup quota),
# at most 4; tests/conftest.py pins each worker to its share of the cores. Read once .venv exists.
TEST_WORKERS ?= $(shell $(BIN)/python -c 'from kftune.hardware import threads_here; print(min(threads_here().value, 4))')

.DEFAULT_GOAL := help

# tcmalloc where it is installed (Debian/Ubuntu: libtcmalloc-minimal4), as in the image: fine-tuning 4-7% faster
# and a peak RSS 300 MB lower than with glibc's malloc (README, Performance). An LD_PRELOAD of yours wins.
TCMALLOC := $(firstword $(wildcard /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4))
ifneq ($(TCMALLOC),)
ifeq ($(LD_PRELOAD),)
run demo-drift demo-loop serve: export LD_PRELOAD := $(TCMALLOC)
endif
endif
.PHONY: help install dev run exp demo-drift test test-fast compile clean image-base image image-cuda lock test-containers test-postgres infra-check serve serve-manifest

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml requirements.lock | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(VENV)/.installed ## create .venv and install kftune with pinned dependencies

dev: $(VENV)/.dev ## install kftune plus test dependencies

run: install ## generate a demo batch and run the training pipeline end to end (kfp.local + MLflow)
	$(BIN)/kftune demo-data --out data/demo --batch 0 --rows $(DEMO_ROWS)
	$(BIN)/kftune run --data data/demo/batch-000.csv

demo-drift: install ## watch drift detection and retraining on 4 synthetic batches (the last one shifted)
	$(BIN)/kftune demo-drift

demo-loop: install ## the closed loop on replayed traffic: serve, monitor alerts, labels, retraining, v2 swapped in
	$(BIN)/kftune demo-loop

test: dev ## run the whole test suite
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: dev ## the suite without the slow real-data and pipeline tests
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow and not realdata"

serve: install ## serve the champion of MODEL (default kftune-demo) on 127.0.0.1:8080: KServe V1 + V2 REST, /metrics
	$(BIN)/kftune serve --model $(MODEL)

serve-manifest: ## render the KServe InferenceService (infra/k8s/serving) with this project's params.yaml
	kubectl kustomize --load-restrictor LoadRestrictionsNone infra/k8s/serving

EXP_COLUMNS := Experiment|rev|macro_f1|accuracy|ece|tfidf_logreg_macro_f1|beats_tfidf_logreg_by|model.name|finetune.(epochs|max_steps|batch_size|learning_rate)

exp: install ## dvc exp show with the headline metrics and the hyperparameters people change (12 columns, not 128)
	$(BIN)/dvc exp show --drop '.*' --keep '$(EXP_COLUMNS)'

compile: install ## compile both pipelines to *.yaml (set KFTUNE_IMAGE for your registry)
	$(BIN)/kftune compile --pipeline training -o pipeline.yaml
	$(BIN)/kftune compile --pipeline retraining -o retraining.yaml

clean: ## remove local run outputs (keeps .venv, mlflow.db and mlartifacts)
	rm -rf local_outputs .kftune data/demo pipeline.yaml retraining.yaml

image-base: ## a local stand-in for python:3.11-slim (debootstrap bookworm) where no registry is reachable
	infra/scripts/ensure-docker.sh
	infra/scripts/build-base.sh

image: install ## build kftune:0.1.0 and kftune-mlflow:3.17.2 from HEAD and the locks (BASE=python:3.11-slim)
	infra/scripts/build-images.sh

image-cuda: install ## the component image with PyPI's CUDA torch (multi-GB) instead of the locked CPU wheel
	TORCH=cuda IMAGE=$${IMAGE:-kftune:0.1.0-cuda} infra/scripts/build-images.sh

lock: install ## regenerate requirements.lock and infra/mlflow.lock (hash-pinned) from the tested .venv
	$(BIN)/python infra/scripts/lock.py

test-containers: dev ## both pipelines task by task in the images: docker, base, images, MLflow server, S3
	infra/scripts/ensure-docker.sh
	@if [ -z "$$BASE" ]; then infra/scripts/build-base.sh; fi
	BASE=$${BASE:-kftune-base:bookworm} infra/scripts/build-images.sh
	KFTUNE_CONTAINER_TESTS=1 $(BIN)/pytest -q -p no:cacheprovider tests/containers

test-postgres: dev ## MLflow server on PostgreSQL (installed from Debian if missing) + S3, the pipeline against it
	$(BIN)/pytest -q tests/test_mlflow_postgres.py

infra-check: dev ## render every kustomize overlay and validate it against the Kubernetes schemas
	$(BIN)/pytest -q tests/test_infra.py
