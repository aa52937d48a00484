# vlmtune: the whole set-up is `make install` then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 are served from local disk on the project machines; pinning them here
# keeps pip from resolving a newer torch (gigabytes of download).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast test-multiprocess test-all lint demo clean

install: $(BIN)/vlmtune

$(BIN)/vlmtune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[dev]'  # deepspeed from source without prebuilt ops: seconds
	@touch $@

# the multi-process suites (2-process torchrun / DeepSpeed ZeRO-2/3 runs) are slow on 2 cores: `make test` (what CI
# runs, under 20 minutes) takes only the multiprocess_ci subset; `make test-multiprocess` the rest of them
test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q --durations=25 -m "not multiprocess or multiprocess_ci"

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "not slow and not multiprocess"

test-multiprocess: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "multiprocess and not multiprocess_ci"

test-all: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

lint: install
	$(BIN)/ruff check vlmtune tests bench

# a second `make demo` refuses to replace the finished run: `make demo DEMO_ARGS=--overwrite` replaces it
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/vlmtune sft recipes/tiny-demo.yaml $(DEMO_ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache .hypothesis
