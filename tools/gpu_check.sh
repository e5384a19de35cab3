#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one time-boxed run that saves everything under $OUT as it goes:
#   build      llama-cpp-python with CUDA (scripts/setup.sh with -DGGML_CUDA=on, sm_90)
#   smi        nvidia-smi
#   tests      the tests that skip without CUDA
#   bench      a synthetic qwen35moe with the real expert widths (Q4_K), LAYERS blocks:
#              tools/bench_gpu.py's variants (resident blocks only, rotary streaming, split compute and
#              an uploading expert cache) under a VRAM budget, decode t/s and NVML peak memory, and
#              the speed model's predicted t/s beside them
#   telemetry  tools/bench_telemetry.py on the GPU (what the routing tap costs there)
# and two more, not in the default list (a session has 15 minutes of GPU in all):
#   mtp        tools/bench_mtp.py: decode with and without MTP drafts, experts on the host, the rest
#              on CUDA0 (a bench-dims model of 8 blocks with an MTP block)
#   predict    `rotary-gguf bench --calibrate` on the bench model: the speed model's prompt and
#              decode t/s beside the measured ones on this GPU
#
# Usage: OUT=gpu-out bash tools/gpu_check.sh
# The CUDA build alone takes minutes: where one command may run 10 minutes, run STEPS=build first
# and STEPS="smi tests bench telemetry" next on the same (warm) machine, which keeps .venv.
# Settings (environment): OUT (default ./gpu-out), STEPS (default all, in the order above),
# LAYERS (16), VRAM (6.3GB), SPLIT_SIZES ("auto 64"), UPLOAD_SIZES ("64"),
# CUDA_CMAKE_ARGS (the CMake flags of the build), FULL_SUITE=1 (also the whole test suite), and
# the per-step time limits in seconds BUILD_TIMEOUT (540), TESTS_TIMEOUT (180), MODEL_TIMEOUT
# (240), VARIANT_TIMEOUT (120 per bench variant), TELEMETRY_TIMEOUT (150), MTP_TIMEOUT (300),
# PREDICT_TIMEOUT (300).
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-./gpu-out}
STEPS=${STEPS:-build smi tests bench telemetry}
LAYERS=${LAYERS:-16}
VRAM=${VRAM:-6.3GB}
SPLIT_SIZES=${SPLIT_SIZES:-auto 64}
UPLOAD_SIZES=${UPLOAD_SIZES:-64}
CUDA_CMAKE_ARGS=${CUDA_CMAKE_ARGS:--DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90}
MODEL_DIR=build/gpu-check  # ignored by git; the model (~0.5 GB per block) must not land in $OUT
PY=.venv/bin/python

mkdir -p "$OUT" "$MODEL_DIR"
exec > >(tee -a "$OUT/log.txt") 2>&1
START=$SECONDS

# pip has no network there: fail fast instead of retrying
export PIP_RETRIES=${PIP_RETRIES:-0} PIP_DEFAULT_TIMEOUT=${PIP_DEFAULT_TIMEOUT:-10} PIP_DISABLE_PIP_VERSION_CHECK=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
if ! command -v nvcc >/dev/null; then
    for dir in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
        [ -x "$dir/nvcc" ] && { PATH="$dir:$PATH"; break; }
    done
fi

step() {  # step NAME LIMIT_S COMMAND...: run one time-boxed step, log its status and time
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s, at +$((SECONDS - START))s): $*"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    [ $rc -eq 124 ] && echo "!!! $name ran past ${limit}s and was stopped"
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    echo "$name exit=$rc seconds=$((SECONDS - t0))" >> "$OUT/summary.txt"
    return $rc
}

wanted() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }

cuda_built() {  # the installed llama-cpp-python has the CUDA backend
    "$PY" - <<'PY' 2>/dev/null
import pathlib, sys
import llama_cpp
sys.exit(0 if (pathlib.Path(llama_cpp.__file__).parent / "lib" / "libggml-cuda.so").exists() else 1)
PY
}

echo "gpu check: $(date -u +%FT%TZ), steps: $STEPS, $(nproc) cores, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

if wanted build; then
    step build "${BUILD_TIMEOUT:-540}" env CMAKE_ARGS="$CUDA_CMAKE_ARGS" EXTRAS=dev bash scripts/setup.sh
    if ! cuda_built; then
        echo "--- no CUDA build: what the machine has"
        command -v nvcc && nvcc --version | tail -2
        command -v cmake ninja gcc
        "${PYTHON:-python3}" --version
        "${PYTHON:-python3}" -m pip config list
        "${PYTHON:-python3}" -m pip cache list 2>/dev/null | grep -i -E "llama|gguf|scikit|cmake" | head
        env | grep -i -E "^PIP_|CUDA" | sort
    fi
fi

if wanted smi; then
    step nvidia-smi 30 bash -c 'nvidia-smi > "$1/nvidia-smi.txt" 2>&1; rc=$?; cat "$1/nvidia-smi.txt"; exit $rc' _ "$OUT"
fi

if ! cuda_built; then
    echo "!!! llama-cpp-python in .venv has no CUDA backend (libggml-cuda.so): the GPU steps cannot run"
    exit 1
fi

if wanted tests; then
    # every test that skips without CUDA (grep tests/ for has_cuda), and what they print on skipping
    step gpu-tests "${TESTS_TIMEOUT:-180}" "$PY" -m pytest -q -rs -p no:cacheprovider \
        tests/test_placement.py::test_rotary_mode_streams_from_pinned_memory \
        tests/test_placement.py::test_upload_speed_on_a_gpu \
        | tee "$OUT/gpu-tests.txt"
    grep -q "skipped" "$OUT/gpu-tests.txt" && echo "!!! a GPU test was skipped: the CUDA device was not found"
    if [ "${FULL_SUITE:-0}" = 1 ]; then
        step full-suite "${TESTS_TIMEOUT:-180}" "$PY" -m pytest -q -rs -p no:cacheprovider tests/ \
            | tee "$OUT/full-suite.txt"
    fi
fi

if wanted bench; then
    model=$MODEL_DIR/bench-$LAYERS.gguf
    rm -f "$MODEL_DIR"/.bench-*.tmp  # left by a generation that was stopped
    if [ ! -s "$model" ]; then
        step bench-model "${MODEL_TIMEOUT:-240}" "$PY" tools/make_test_model.py -o "$model" --bench-dims --layers "$LAYERS"
    fi
    # shellcheck disable=SC2086  # the sizes are lists
    n_variants=$((2 + $(echo $SPLIT_SIZES $UPLOAD_SIZES | wc -w)))
    step bench "$((n_variants * ${VARIANT_TIMEOUT:-120} + 30))" "$PY" tools/bench_gpu.py "$model" --vram "$VRAM" \
        --split $SPLIT_SIZES --upload $UPLOAD_SIZES --timeout "${VARIANT_TIMEOUT:-120}" --out "$OUT/bench"
fi

if wanted telemetry && [ -f tools/bench_telemetry.py ]; then
    step telemetry "${TELEMETRY_TIMEOUT:-150}" "$PY" tools/bench_telemetry.py --device CUDA0 --layers 40 \
        --rounds 3 --tokens 64 | tee "$OUT/telemetry.txt"
fi

if wanted mtp; then
    step mtp "${MTP_TIMEOUT:-300}" "$PY" tools/bench_mtp.py --device CUDA0 --layers 8 --runs 2 --tokens 64 \
        --draft-max 1,2 --threads "$(nproc)" | tee "$OUT/mtp.txt"
fi

if wanted predict; then
    model=$MODEL_DIR/bench-$LAYERS.gguf
    if [ ! -s "$model" ]; then
        step bench-model "${MODEL_TIMEOUT:-240}" "$PY" tools/make_test_model.py -o "$model" --bench-dims --layers "$LAYERS"
    fi
    step predict "${PREDICT_TIMEOUT:-300}" .venv/bin/rotary-gguf bench "$model" --vram "$VRAM" --calibrate --runs 2 \
        --gen-tokens 48 --prompt-tokens 64 --ctx 1024 | tee "$OUT/predict.txt"
fi

echo "gpu check done after $((SECONDS - START))s; results in $OUT"
