#!/usr/bin/env bash
# Build the folder of packages the lent GPU machine lacks (it has Python 3.12 and torch, no network):
#
#   bash tests/gpu/prepare_wheelhouse.sh [PYTHON_VERSION=3.12] [DEST=tests/gpu/wheelhouse]
#
# Binary wheels of the pure-Python and small compiled pins for that Python (manylinux x86_64), and the two
# packages that exist only as source (antlr4-python3-runtime, fairseq-fixed), which the GPU machine builds
# against its own torch. Run here, where PyPI is reachable. Two folders, each under the 64 MiB that one
# device call carries: 1-scientific (scikit-learn, scipy) and 2-core (the rest).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYVER=${1:-3.12}
DEST=${2:-$ROOT/tests/gpu/wheelhouse}
PIP=${PIP:-$ROOT/.venv/bin/pip}
mkdir -p "$DEST/1-scientific" "$DEST/2-core"
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
# `import fairseq` imports every task module, one of them scikit-learn (and so scipy): the largest part,
# in a folder of its own so that each folder travels within one call's 64 MiB
"$PIP" download -q --dest "$DEST/1-scientific" --python-version "$PYVER" --only-binary=:all: "${PLATFORMS[@]}" \
    --no-deps scikit-learn==1.9.1 scipy==1.17.1 joblib threadpoolctl cloudpickle narwhals
# the rest of what fairseq and its training CLI import, and pytest for the checks (no torch: the machine has it)
"$PIP" download -q --dest "$DEST/2-core" --python-version "$PYVER" --only-binary=:all: "${PLATFORMS[@]}" \
    --no-deps hydra-core==1.3.2 omegaconf==2.3.0 PyYAML bitarray regex cffi pycparser sacrebleu portalocker \
    tabulate colorama lxml packaging tqdm numpy==2.4.6 cython 'setuptools<81' wheel pytest pluggy iniconfig pygments
# source only: fetched without building (fairseq's metadata needs the installed torch: no isolation)
env -u CUDA_HOME "$PIP" download -q --dest "$DEST/2-core" --no-deps --no-binary=:all: --no-build-isolation \
    antlr4-python3-runtime==4.9.3 fairseq-fixed==0.12.3.1
du -sh "$DEST"/*
