# The two commands a newcomer runs (see README.md):
#   make demo   set up .venv, prepare the Shakespeare corpus, train the debug model on CPU/GPU, sample
#   make test   set up .venv and run the test suite
PY := .venv/bin/python
BT := .venv/bin/bigtrain

.PHONY: setup demo test data bench
setup: .venv/.setup-done
.venv/.setup-done: pyproject.toml launch/setup.sh
	bash launch/setup.sh
	touch $@

data/shakespeare/meta.json: .venv/.setup-done
	$(BT) prepare --out data/shakespeare

data: data/shakespeare/meta.json

demo: data
	$(BT) train --config configs/debug.yaml train.resume=auto
	$(BT) sample --run runs/debug --prompt "ROMEO:" --max-new-tokens 120

test: setup
	$(PY) -m pytest -q tests

# Tokens/s per layout on this machine and the FLOPs check (see BENCHMARKS.md).
bench: data
	$(PY) bench/throughput.py --layouts single,tp2,tp2sp,dp2 --steps 30
