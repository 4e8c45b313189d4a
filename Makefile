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

clean: ## Remove caches (not runs/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
