#!/usr/bin/env bash
# Prepare what bench/gpu.sh needs on a lent GPU machine (docs/gpu.md). Runs HERE, on the CPU machine.
#
#   .whl/  wheels the device image lacks (zarr of the version installed here, and its needs that the
#          image does not hold: numcodecs, donfig, google-crc32c), for CPython $GPU_PY_VERSION x86-64
#   .gpu/  the inputs of the GPU run: teacher/ (the real teacher's config + tokenizer, no weights),
#          store/ (a kdship store written here by `kdship cache --backend vllm` from the real teacher on
#          $GPU_PASSAGES Shakespeare passages, default headtail targets), data.jsonl, prepare.json
# Both folders are git-ignored (.gitignore) and travel as the device call's carry [".whl", ".gpu"].
#
# Usage: PY=/path/to/kdship-venv/python bash bench/gpu_prepare.sh
#   PY               python with kdship's deps and vLLM (default: .venv/bin/python, else python3)
#   GPU_PASSAGES     Shakespeare passages in the store (default 400)
#   GPU_PY_VERSION   python version of the wheels (default 3.12, the device's python3)
#   WHL_DIR, GPU_DIR where to write (default .whl and .gpu in the repository root)
#   GPU_WHEELS_ONLY  set: step 1 only
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
PASSAGES="${GPU_PASSAGES:-400}"
PYV="${GPU_PY_VERSION:-3.12}"
WHL="${WHL_DIR:-$ROOT/.whl}"
GPU="${GPU_DIR:-$ROOT/.gpu}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# vLLM in-process and offline (as kdship.demo.pipeline.env_defaults)
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

# 1. wheels: the versions installed here, so the device runs the zarr kdship was tested with
WANT=(zarr numcodecs donfig google-crc32c)
mkdir -p "$WHL"
PINS=$("$PY" - "${WANT[@]}" <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))
EOF
)
echo "wheels for CPython $PYV x86-64: $PINS"
PYTAG="cp${PYV/./}"
for pin in $PINS; do
  name="${pin%%==*}"; ver="${pin##*==}"; stem="${name//-/_}"
  if ls "$WHL/${stem}-${ver}-"*.whl 2>/dev/null | grep -qE -- "-(py3|$PYTAG)-"; then continue; fi
  rm -f "$WHL/${stem}-"*.whl  # one version of each: two would stop the install there
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "$pin"
done
echo "their requirements (the device image must hold those not in .whl/):"
for w in "$WHL"/*.whl; do
  echo "  $(basename "$w"): $(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/Requires-Dist: //' | paste -sd, -)"
done

if [ -n "${GPU_WHEELS_ONLY:-}" ]; then exit 0; fi  # e.g. wheels for another python, to rehearse gpu.sh here

# 2. the teacher's config and tokenizer (its weights cannot travel)
TEACHER="${TEACHER:-$("$PY" -c 'from kdship.demo.assets import smollm2_dir; print(smollm2_dir())')}"
mkdir -p "$GPU/teacher"
for f in "$TEACHER"/*; do
  case "$f" in *.safetensors|*.bin|*.pt|*.gguf|*/kdship_asset.json) ;; *) [ -f "$f" ] && cp "$f" "$GPU/teacher/" ;; esac
done

# 3. the store: the real teacher through vLLM on real text (skipped when one of these settings exists)
"$PY" - "$GPU" "$PASSAGES" "$TEACHER" <<'EOF'
import json, random, subprocess, sys, time
from pathlib import Path

from kdship.demo.assets import shakespeare_passages
from kdship.tiny import write_jsonl

gpu, n, teacher = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
texts = [p["text"] for p in shakespeare_passages()]
random.Random(0).shuffle(texts)
want = {"passages": n, "teacher": teacher, "targets": "headtail", "backend": "vllm", "max_length": 512, "shard_positions": "default", "seed": 0}
info_file = gpu / "prepare.json"
if info_file.is_file() and json.loads(info_file.read_text()).get("settings") == want and (gpu / "store").is_dir():
    print(f"store: {gpu / 'store'} already written with these settings")
    sys.exit(0)
data = write_jsonl(gpu / "data.jsonl", [{"text": t} for t in texts[:n]])
cmd = [sys.executable, "-m", "kdship", "cache", teacher, str(data), "--out", str(gpu / "store"), "--backend", "vllm", "--targets", "headtail",
       "--max-length", "512", "--overflow", "truncate", "--seed", "0", "--no-progress", "--overwrite", "--json"]
print("$", " ".join(cmd), flush=True)
t0 = time.time()
p = subprocess.run(cmd, capture_output=True, text=True)
if p.returncode:
    sys.exit(f"kdship cache failed ({p.returncode}):\n{p.stderr[-3000:]}")
from kdship.cache.inspect import inspect_store

info = inspect_store(str(gpu / "store"), verify=True)
rec = {"settings": want, "cache_s": round(time.time() - t0, 1), "samples": info["samples"], "positions": info["positions"], "shards": info["shards_committed"],
       "bytes_per_position": info["bytes_per_position"], "headtail": info.get("headtail")}
info_file.write_text(json.dumps(rec, indent=1))
print("store:", json.dumps(rec))
EOF

# 4. ignored (they travel only as carried paths), and small enough to travel
for d in "$WHL" "$GPU"; do
  if ! git check-ignore -q "$d"; then
    rel="/${d#"$ROOT"/}/"
    echo "$rel" >> "$(git rev-parse --git-path info/exclude)"
    echo "added $rel to $(git rev-parse --git-path info/exclude)"
  fi
done
du -sh "$WHL"/* "$GPU"/* | sed 's/^/  /'
total=$(du -sbc "$WHL" "$GPU" | tail -1 | cut -f1)
echo "carry total: $((total / 1048576)) MiB (.whl $(du -sh "$WHL" | cut -f1), .gpu $(du -sh "$GPU" | cut -f1)); the limit is 64 MiB with the tracked files"
if [ "$total" -gt $((48 * 1048576)) ]; then echo "too big to travel: lower GPU_PASSAGES" >&2; exit 1; fi
echo "device call: command 'bash bench/gpu.sh', carry [\".whl\", \".gpu\"]"
