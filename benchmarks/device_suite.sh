#!/usr/bin/env bash
# python3 -m benchmarks.device_suite on the device machine (one NVIDIA H200, no package registry), from the repo root,
# with the wheels carried in .whl/ (see benchmarks/device_suite.py and README): the packages the machine
# lacks (sam2 1.1.0 built pure-Python with SAM2_BUILD_CUDA=0, hydra-core, omegaconf, antlr4-python3-runtime,
# iopath) plus flax 0.12.8, the version this project is tested with. Only those go to /tmp/site, so the
# machine's own jax, numpy and torch are used. If the carried flax does not work with the machine's jax, it is
# removed and the machine's flax is used (the JSON records the versions).
#
#   bash benchmarks/device_suite.sh [extra device_suite.py arguments]     # writes $OUT/device_suite.json, $OUT/log.txt
#
# Building .whl/ (git-ignored) on a machine with the project's venv and a package index:
#   W="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64"
#   python3 -m pip download $W -d .whl flax==0.12.8 hydra-core==1.3.8 omegaconf==2.3.1
#   .venv/bin/pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3 iopath==0.1.10   # sdists: pure-Python wheels
#   SAM2_BUILD_CUDA=0 .venv/bin/pip wheel --no-build-isolation --no-deps -w .whl sam2==1.1.0
set -u
OUT=${OUT:-/tmp/device_suite_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
if ! python3 -c "import jax.numpy as jnp; from flax import nnx; print('flax', nnx.Linear(2, 3, rngs=nnx.Rngs(0))(jnp.ones((1, 2))).shape)"; then
  echo "the carried flax does not work with this jax: using the machine's flax"
  rm -rf /tmp/site/flax /tmp/site/flax-*.dist-info
fi
python3 -c "import jax, flax, torch, sam2, medsam2_jax.tracking; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
set -o pipefail
PYTHONUNBUFFERED=1 python3 -m benchmarks.device_suite --out "$OUT/device_suite.json" "$@" 2>&1 | tee "$OUT/log.txt"
