# finetune: fine-tune an LLM for text-to-SQL and evaluate it by running its SQL.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
IMAGE  ?= finetune-job:latest

.DEFAULT_GOAL := help
.PHONY: help install test lint demo bench docker-build clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed ## Create .venv: torch first (CPU build here), then the project with dev extras

test: install ## Run the whole test suite (what CI runs)
	$(BIN)/pytest -q

lint: install ## ruff, and hadolint on the Dockerfile
	$(BIN)/ruff check job tests benchmarks infra
	$(BIN)/hadolint docker/Dockerfile

demo: install ## Fine-tune SmolLM2-135M-Instruct on shipped real rows on the CPU; base vs tuned report
	$(BIN)/python -m job.train.demo_model models
	$(BIN)/finetune run --config smollm2-135m-cpu-demo --output runs/demo

bench: install ## Benchmarks against their baselines; writes BENCHMARKS.md (not part of CI)
	$(BIN)/python benchmarks/run_all.py

docker-build: ## Build the CUDA image (needs a Docker engine)
	docker build -f docker/Dockerfile -t $(IMAGE) .

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
