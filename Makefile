# finetune: fine-tune an LLM for text-to-SQL and evaluate it by running its SQL.
PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
VERSION  := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# torch is installed first and on its own, from a wheel index: the CPU build by default (a machine whose pip is
# configured with a local wheelhouse takes it from there), a CUDA build with e.g.
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
TORCH_VERSION   ?= 2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
LOCK_FLAGS := --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
              --overrides requirements/overrides.txt --custom-compile-command "make lock" --quiet

# Image, submission and fetch settings (override on the command line: make push REGISTRY=ghcr.io/me TAG=dev)
REGISTRY  ?= registry.example.com
TAG       ?= $(VERSION)
IMAGE     ?= finetune-job
IMAGE_REF := $(if $(REGISTRY),$(REGISTRY)/,)$(IMAGE):$(TAG)
ENV_FILE  ?= .env
CACHE_VOL ?= finetune-cache
RUNS_DIR  ?= runs
# docker stop's grace: SIGTERM -> the job saves a checkpoint; under torchrun (`launch ...`) it gets 150 s for that
STOP_TIMEOUT ?= 180
ARGS      ?= run --config gemma-2b-it-qlora
OVERLAY   ?= single-gpu
NAMESPACE ?= default
RUN_ID    ?= finetune-gemma-2b-it-qlora
BUCKET    ?= my-bucket
ROLE      ?=
SM_ARGS   ?=
DRY_RUN   ?=
RUN       ?=
DEST      ?= runs/pulled
# The CPU demo: gemma3-270m-cpu-demo (Gemma 3 270M base, Gemma Terms of Use) or smollm2-135m-cpu-demo
# (SmolLM2-135M-Instruct, Apache-2.0); BENCHMARKS.md compares the two
DEMO      ?= gemma3-270m-cpu-demo

.DEFAULT_GOAL := help
.PHONY: help install lock test lint demo bench image docker-build push run-local k8s-render k8s-submit k8s-logs \
        k8s-delete sagemaker-submit pull clean

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-17s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps --index-url "$(TORCH_INDEX_URL)" "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"  # torch's own dependencies, for the build just installed
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	touch $@

install: $(BIN)/.installed ## Create .venv: torch (TORCH_INDEX_URL; CPU by default), then the hash-pinned dev lock

lock: ## Re-resolve requirements/{image,dev}.txt (hash-pinned, torch left out) from pyproject.toml with uv
	$(BIN)/uv pip compile pyproject.toml --extra gpu $(LOCK_FLAGS) -o requirements/image.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_FLAGS) -c requirements/image.txt -o requirements/dev.txt

test: install ## Run the whole test suite (what CI runs)
	$(BIN)/pytest -q

lint: install ## ruff, and hadolint on the Dockerfile
	$(BIN)/ruff check job tests benchmarks infra
	$(BIN)/hadolint docker/Dockerfile

demo: install ## Fine-tune the DEMO preset's model on shipped real rows on the CPU; base vs tuned report
	$(BIN)/python -m job.train.demo_model models --preset $(DEMO)
	$(BIN)/finetune run --config $(DEMO) --output runs/demo

bench: install ## Benchmarks against their baselines; writes BENCHMARKS.md (not part of CI)
	$(BIN)/python benchmarks/run_all.py

image: ## Build the GPU image IMAGE_REF (needs a Docker engine; TAG defaults to the package version)
	docker build -f docker/Dockerfile -t $(IMAGE_REF) .
	docker build -f docker/Dockerfile --target sagemaker -t $(IMAGE_REF)-sagemaker .

docker-build: image ## Same as `image`

push: ## Push IMAGE_REF and its -sagemaker variant to REGISTRY
	docker push $(IMAGE_REF)
	docker push $(IMAGE_REF)-sagemaker

# The container runs as the owner of RUNS_DIR (created first, so a new one is yours, not the Docker daemon's), so
# it can write there and what it writes is the owner's; that uid has no home in the image, hence HOME=/tmp (the
# image's /cache is writable by any uid). ENV_FILE (secrets) is passed when it exists; naming one that does not
# exist is an error. tini is the image's PID 1: no --init.
ENV_FILE_OPTION = $(if $(wildcard $(ENV_FILE)),--env-file $(ENV_FILE),$(if $(filter file,$(origin ENV_FILE)),,\
                  $(error ENV_FILE=$(ENV_FILE) does not exist)))
run-local: ## docker run --gpus all IMAGE_REF ARGS as RUNS_DIR's owner, with ENV_FILE if present and CACHE_VOL on /cache
	mkdir -p "$(RUNS_DIR)"
	docker run --rm --gpus all --shm-size 8g --stop-timeout $(STOP_TIMEOUT) \
	  --user "$$(stat -c %u:%g "$(RUNS_DIR)" 2>/dev/null || stat -f %u:%g "$(RUNS_DIR)")" -e HOME=/tmp $(ENV_FILE_OPTION) \
	  -v $(CACHE_VOL):/cache -v "$(abspath $(RUNS_DIR)):/workspace/runs" $(IMAGE_REF) $(ARGS)

k8s-render: ## Print the OVERLAY (single-gpu, multi-gpu, multi-node) with IMAGE_REF, BUCKET, RUN_ID filled in
	@$(BIN)/python infra/k8s/render.py $(OVERLAY) --image $(IMAGE_REF) --bucket $(BUCKET) --run-id $(RUN_ID)

k8s-submit: ## Render OVERLAY and apply it in NAMESPACE; a failed Job of RUN_ID is replaced (it resumes)
	$(BIN)/python infra/k8s/submit.py $(OVERLAY) --image $(IMAGE_REF) --bucket $(BUCKET) --run-id $(RUN_ID) \
	  --namespace $(NAMESPACE)

k8s-logs: ## Follow the logs of job RUN_ID (all pods; the job's stderr)
	kubectl logs -n $(NAMESPACE) -f --all-containers --prefix -l batch.kubernetes.io/job-name=$(RUN_ID)

k8s-delete: ## Delete what k8s-submit created for RUN_ID: Job, pods, Service, ConfigMap (the bucket keeps the results)
	kubectl delete -n $(NAMESPACE) --ignore-not-found --cascade=foreground job/$(RUN_ID) service/$(RUN_ID)
	kubectl delete -n $(NAMESPACE) --ignore-not-found configmap -l app.kubernetes.io/instance=$(RUN_ID)

sagemaker-submit: ## SageMaker training job with IMAGE_REF-sagemaker, ROLE, SM_ARGS; DRY_RUN=1 prints the request
	$(BIN)/python infra/sagemaker/submit.py --image $(IMAGE_REF)-sagemaker --role "$(ROLE)" \
	  --bucket $(BUCKET) $(SM_ARGS) $(if $(DRY_RUN),--dry-run,)

pull: ## Fetch published run RUN=s3://... (or a SageMaker model.tar.gz) into DEST, verified
	$(BIN)/finetune artifacts pull "$(RUN)" "$(DEST)"

# GPU check (docs/gpu.md): the kit carries what an offline CUDA image lacks; gpu-check runs there.
KIT        ?= .gpu-kit
GPU_CUDA   ?= 130
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
WHEEL_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1,--platform $(p)_x86_64)
.PHONY: gpu-wheels gpu-check

gpu-wheels: install ## Offline kit in .gpu-kit/: wheels a CUDA image lacks (benchmarks/gpu_wheels.txt), demo tokenizer
	rm -rf $(KIT)/wheels $(KIT)/site
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d $(KIT)/wheels -r benchmarks/gpu_wheels.txt
	$(BIN)/python benchmarks/gpu_kit.py $(KIT) --cuda $(GPU_CUDA)

gpu-check: ## On a CUDA GPU (about 8 min): the job vs plain trl; writes runs/gpu-check/gpu.json, BENCHMARKS.md section
	if [ -f $(KIT)/install.sh ] && [ ! -d $(KIT)/site ]; then PYTHON=$(GPU_PYTHON) sh $(KIT)/install.sh; fi
	PYTHONPATH=$(CURDIR)/$(KIT)/site:$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py --out runs/gpu-check \
		--benchmarks BENCHMARKS.md $(GPU_CHECK_ARGS)

clean: ## Remove caches (not runs/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
