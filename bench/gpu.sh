#!/usr/bin/env bash
# kdship's GPU check, the one command for a lent GPU machine (docs/gpu.md):
#   device call: command `bash bench/gpu.sh`, carry [".whl", ".gpu"] (written by bench/gpu_prepare.sh)
# Installs the carried wheels (zarr & co; the device has torch, transformers...), prints the machine,
# then bench/gpu_bench.py: matmul ceiling, the loss alone, step profiles, `kdship train` throughput and MFU (store vs online
# teacher), written to $OUT/gpu_results.json, $OUT/gpu.md, $OUT/gpu_log.txt. Back here:
#   python bench/gpu_record.py /work/.device/.../gpu_results.json
# Without CUDA it says so and runs the same steps at small sizes (a rehearsal of this script).
# Time: the python part stops itself at GPU_BUDGET_S (default 440 s) and is killed 45 s after that,
# so the call ends inside ~8 minutes even if a step hangs (device call: timeout_s 540). Extra arguments go to gpu_bench.py (--pairs, --smoke-tests).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/kdship-gpu-out}"
SITE="${KDSHIP_GPU_SITE:-/tmp/site}"
BUDGET="${GPU_BUDGET_S:-440}"
mkdir -p "$OUT"
t0=$(date +%s)

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "gpu.sh: installing the carried wheels failed" >&2; exit 1; }
else
  echo "gpu.sh: no .whl/ (carry it: bench/gpu_prepare.sh writes it); using what python3 has"
fi
export PYTHONPATH="$SITE:$ROOT" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import zarr, numcodecs, kdship.store" || { echo "gpu.sh: kdship's store cannot be imported (wheels missing?)" >&2; exit 1; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; then
  cat "$OUT/nvidia-smi.txt"
else
  rm -f "$OUT/nvidia-smi.txt"
  echo "gpu.sh: no working nvidia-smi: a CPU-only machine; the steps run at small sizes (not a GPU measurement)"
fi
python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda, \
'available', torch.cuda.is_available(), '| transformers', transformers.__version__)"

timeout -k 10 $((BUDGET + 45)) python3 bench/gpu_bench.py --out "$OUT" --budget-s "$BUDGET" "$@"
rc=$?
echo "gpu.sh: exit $rc after $(( $(date +%s) - t0 )) s; files in $OUT: $(ls "$OUT" | paste -sd' ' -)"
exit $rc
