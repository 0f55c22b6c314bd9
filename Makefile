# `make demo` and `make test` create .venv when it is missing, in the verified install order.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# One stamp per install recipe: editing requirements.txt, setup.py or this file reinstalls.
STAMP := $(VENV)/.installed-$(shell cat requirements.txt setup.py Makefile | cksum | cut -d' ' -f1)
DEMO_DIR ?= demo_out
JOBS ?= 2

.PHONY: install test demo bench clean-demo
install: $(STAMP)

$(STAMP): requirements.txt setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.installed-*
	$(PIP) install -q --upgrade pip
	# 1. torch, CPU build, before anything that could pull a CUDA one.
	$(PIP) install -q torch==2.13.0
	# 2. build tools for fairseq's extensions.
	$(PIP) install -q numpy cython wheel 'setuptools<81'
	# 3. fairseq, compiled against the installed torch (about 2 minutes the first time).
	$(PY) -c "import fairseq" 2>/dev/null || env -u CUDA_HOME $(PIP) install -q --no-cache-dir --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
	# 4. the rest, pinned; no torchaudio.
	$(PIP) install -q hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
	    bitarray cffi regex sacrebleu tqdm scikit-learn faiss-cpu==1.15.1 sentencepiece zstandard matplotlib pytest pytest-xdist==3.8.0
	# 5. the [hf] extra: Hugging Face backbones, loaded offline (torch already satisfies accelerate)
	$(PIP) install -q transformers==5.24.0 gguf==0.19.0 accelerate==1.15.0
	$(PIP) install -q --no-deps -e .
	@touch $@

# two workers (JOBS), one thread each (tests/conftest.py): 9.5 min here where one worker took 19
test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) tests

demo: $(STAMP)
	$(PY) -m longmem.demo --out $(DEMO_DIR) --workers $(JOBS)

bench: $(STAMP)
	for b in tests/benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean-demo:
	rm -rf $(DEMO_DIR)
