#!/usr/bin/env bash
# The GPU check, one command on the lent GPU machine (Python 3.12 with torch, no network), from the
# repository's root, the folder of tests/gpu/prepare_wheelhouse.sh carried along:
#
#   bash tests/gpu/run_gpu_check.sh
#
# with the device tool: a first call carrying ["tests/gpu/wheelhouse/1-scientific"] installs it and stops
# (exit 3: the rest is missing); a second call right after, on the still warm machine, carrying
# ["tests/gpu/wheelhouse/2-core"], installs the rest and runs everything (each folder is under the 64 MiB
# a call carries; where the machine already has numpy, scipy and scikit-learn one call does).
#
# 1. what the machine has; 2. installs fairseq (built against its torch), the pins and this package from
# the wheelhouse, offline; 3. the CUDA checks of tests/gpu/gpu_check.py; 4. the memory benchmark on the
# GPU, its section written to $OUT/benchmarks_gpu.md (copy it into docs/benchmarks.md).
# CHECK_DEVICE=cpu runs steps 3-4 on the CPU (what a machine without a GPU can prove of this script).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WH=${WHEELHOUSE:-$ROOT/tests/gpu/wheelhouse}
OUT=${OUT:-$ROOT/gpu_check_out}
PY=${PYTHON:-python3}
DEV=${CHECK_DEVICE:-cuda}
mkdir -p "$OUT"
start=$(date +%s)
echo "== 1. machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
(c++ --version 2>/dev/null | head -1) || echo "no C++ compiler: fairseq cannot be built here"
"$PY" -m pip --version

echo "== 2. install, offline, from the folders of $WH carried in this call"
have() { "$PY" -c "import $1" 2>/dev/null; }
found=0
for dir in "$WH"/*/; do
  [[ -d $dir ]] || continue
  found=1
  wheels=()
  for w in "$dir"*.whl; do
    [[ -e $w ]] || continue
    name=$(basename "$w" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
    case $name in  # keep what the machine already has
      numpy|scipy|setuptools|wheel|pytest) have "$name" && continue ;;
      cython) have Cython && continue ;; scikit_learn) have sklearn && continue ;;
    esac
    wheels+=("$w")
  done
  (( ${#wheels[@]} )) && "$PY" -m pip install -q --no-index --no-deps "${wheels[@]}"
  for sdist in "$dir"antlr4-python3-runtime-*.tar.gz; do
    [[ -e $sdist ]] && { have antlr4 || "$PY" -m pip install -q --no-index --no-deps --no-build-isolation "$sdist"; }
  done
  for sdist in "$dir"fairseq_fixed-*.tar.gz; do
    [[ -e $sdist ]] && { have fairseq || env -u CUDA_HOME "$PY" -m pip install -q --no-index --no-deps --no-build-isolation "$sdist"; }
  done
done
(( found )) || { echo "no wheelhouse folder under $WH: run tests/gpu/prepare_wheelhouse.sh where PyPI is reachable, and carry it" >&2; exit 2; }
missing=$("$PY" -c "
import importlib.util as u
need = ['numpy', 'sklearn', 'scipy', 'joblib', 'cloudpickle', 'narwhals', 'hydra', 'omegaconf', 'antlr4', 'bitarray', 'regex', 'sacrebleu', 'fairseq', 'pytest']
print(' '.join(m for m in need if u.find_spec(m) is None))")
if [[ -n $missing ]]; then
  echo "still missing: $missing -- carry the other wheelhouse folder in the next call (the machine keeps what was installed while it stays warm)"
  exit 3
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT"
"$PY" -c "import longmem, fairseq; print('fairseq', fairseq.__version__, 'and longmem import')"
echo "install done after $(( $(date +%s) - start )) s"

echo "== 3. checks on $DEV"
LONGMEM_CHECK_DEVICE=$DEV "$PY" -m pytest -q -s -p no:cacheprovider "$ROOT/tests/gpu/gpu_check.py" 2>&1 | tee "$OUT/gpu_check.log" | grep -v "Warning\|warn"
echo "checks done after $(( $(date +%s) - start )) s"

echo "== 4. memory benchmark on $DEV"
cp "$ROOT/docs/benchmarks.md" "$OUT/benchmarks_gpu.md"
"$PY" "$ROOT/tests/benchmarks/bench_memory.py" --device "$DEV" --repeats 3 --doc "$OUT/benchmarks_gpu.md" | tee "$OUT/bench.log"
echo "all done after $(( $(date +%s) - start )) s"
