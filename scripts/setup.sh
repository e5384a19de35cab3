#!/usr/bin/env bash
# Idempotent setup: a .venv with llama-cpp-python built from source with ggml-rpc (plus any
# CMAKE_ARGS you set, e.g. -DGGML_CUDA=on), and rotary-gguf installed in editable mode.
# The second run takes seconds: nothing is rebuilt when the right build is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_VERSION=0.3.36
PY=${PYTHON:-python3}
VENV=.venv
VPY=$VENV/bin/python

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: rotary-gguf needs Python 3.11 or newer ($PY is $("$PY" --version 2>&1))" >&2
    exit 2
fi
[ -x "$VPY" ] || "$PY" -m venv "$VENV"

want_cuda=0
case " ${CMAKE_ARGS:-} " in *"-DGGML_CUDA=on"*|*"-DGGML_CUDA=ON"*) want_cuda=1 ;; esac

llama_ok() {
    WANT_CUDA=$want_cuda "$VPY" - "$LLAMA_VERSION" <<'PY' 2>/dev/null
import os, pathlib, sys
import importlib.metadata as md
if md.version("llama-cpp-python") != sys.argv[1]:
    sys.exit(1)
spec = __import__("importlib.util").util.find_spec("llama_cpp")
lib = pathlib.Path(spec.origin).parent / "lib"
needed = ["libggml-rpc.so"] + (["libggml-cuda.so"] if os.environ["WANT_CUDA"] == "1" else [])
if not all((lib / n).exists() for n in needed):
    sys.exit(1)
# A build that compiled ggml's AMX buffer type crashes at the first decode of a quantized model
# (llama-cpp-python 0.3.36 on Sapphire Rapids and later): such a build must be replaced.
cpu_libs = list(lib.glob("libggml-cpu*.so"))
sys.exit(1 if any(b"ggml_backend_amx_mul_mat" in p.read_bytes() for p in cpu_libs) else 0)
PY
}

# ggml's native build compiles its AMX kernels on CPUs that have AMX, and llama.cpp then puts
# quantized weights in the AMX buffer type, whose matmul crashes in this llama.cpp. Keep every
# other native instruction (AVX-512, VNNI, the repacked CPU kernels) and leave AMX out. GCC and
# Clang let an explicit -mno-* win over -march=native wherever it stands on the command line.
case "$(uname -m)" in
    x86_64|amd64)
        NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        if echo 'int main(void){return 0;}' | ${CC:-cc} $NO_AMX -x c -o /dev/null - 2>/dev/null; then
            export CFLAGS="${CFLAGS:+$CFLAGS }$NO_AMX" CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }$NO_AMX"
        fi ;;
esac

smoke_stamp=$VENV/.rotary-gguf-smoke-ok
if ! llama_ok; then
    rm -f "$smoke_stamp"
    export CMAKE_ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-DGGML_RPC=on"
    echo "building llama-cpp-python $LLAMA_VERSION from source with CMAKE_ARGS='$CMAKE_ARGS' (about 6-12 minutes on 2 cores)..."
    "$VPY" -m pip install --quiet --upgrade pip
    "$VPY" -m pip install --quiet "llama-cpp-python==$LLAMA_VERSION"
    if ! llama_ok; then
        # pip reuses a wheel it built earlier whatever CMAKE_ARGS say: rebuild without the cache.
        echo "the cached llama-cpp-python build lacks the wanted backends; rebuilding without pip's cache..."
        "$VPY" -m pip install --quiet --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$LLAMA_VERSION"
    fi
    llama_ok || { echo "error: the llama-cpp-python $LLAMA_VERSION build lacks the RPC backend or has ggml's AMX kernels; see $VENV/lib/python*/site-packages/llama_cpp/lib" >&2; exit 1; }
fi

# Extras to install: "dev" by default; `make test` adds "train" (torch, for the demo-model trainer's test).
EXTRAS=${EXTRAS:-dev}
stamp=$VENV/.rotary-gguf-installed
want=$( (cat pyproject.toml; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$VPY" -c 'import rotary_gguf' 2>/dev/null; then
    echo "installing rotary-gguf and its dependencies into $VENV..."
    "$VPY" -m pip install --quiet -e ".[$EXTRAS]"
    echo "$want" > "$stamp"
fi

# After every build or install: decode a few tokens of the demo model in a child process, so a
# build that crashes on this CPU is one clear line here, not a crash at the first answer.
if [ "$(cat "$smoke_stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/rotary-gguf" doctor --brief || exit 1
    echo "$want" > "$smoke_stamp"
fi
