# llama.cpp for side-by-side measurements, sourced by the scripts beside it.
#
# Callers set WORK (where everything is fetched and built; git ignores
# target/) and then call:
#   llama_cpp_build TARGET...   the pinned Python tools in $WORK/venv and the
#                               `llama-cpp-python` 0.3.36 source package from
#                               PyPI (its vendor/llama.cpp, checked against
#                               its sha256), built natively into $BUILD/bin
#   llama_cpp_convert HF OUT    a Hugging Face checkpoint to a bf16 GGUF with
#                               llama.cpp's own convert_hf_to_gguf.py
# Nothing of llama.cpp is committed.

LLAMA_VERSION=0.3.36
LLAMA_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
VENV="$WORK/venv"
SRC="$WORK/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
BUILD="$WORK/llama-build"
mkdir -p "$WORK"
log() { echo "[$(basename "$0" .sh)] $*" >&2; }

llama_cpp_build() {
  if [ ! -f "$VENV/.installed" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q cmake==3.31.10 numpy==2.2.6 sentencepiece==0.2.1 \
      transformers==4.57.6 protobuf==4.25.8 safetensors==0.6.2 tokenizers==0.22.2 torch==2.11.0
    touch "$VENV/.installed"
  fi
  if [ ! -d "$SRC" ]; then
    local tarball="$WORK/llama_cpp_python-$LLAMA_VERSION.tar.gz" url
    url=$(curl -fsS -H "Accept: application/vnd.pypi.simple.v1+json" \
      https://pypi.org/simple/llama-cpp-python/ | "$VENV/bin/python" -c "
import json, sys
files = json.load(sys.stdin)['files']
print(next(f['url'] for f in files if f['filename'] == 'llama_cpp_python-$LLAMA_VERSION.tar.gz'))")
    log "fetching $url"
    curl -fsSL -o "$tarball" "$url"
    echo "$LLAMA_SHA256  $tarball" | sha256sum -c --quiet
    tar xzf "$tarball" -C "$WORK"
  fi
  local missing=() t
  for t in "$@"; do [ -x "$BUILD/bin/$t" ] || missing+=("$t"); done
  [ ${#missing[@]} = 0 ] && return
  log "building ${missing[*]} (native) in $BUILD"
  # Native, but without AMX: on the Xeon VM this was written on, its AMX path died with SIGILL
  # (an illegal instruction in libggml-cpu on Q8_0), so a user could not run it.
  local no_amx=""
  grep -qw amx_tile /proc/cpuinfo && no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  "$VENV/bin/cmake" -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON > "$WORK/cmake.log"
  "$VENV/bin/cmake" --build "$BUILD" --config Release -j "$(nproc)" \
    --target "${missing[@]}" > "$WORK/build.log"
}

llama_cpp_convert() { # HF OUT
  local hf=$1 out=$2 name convert_from
  name=$(basename "$hf")
  [ -f "$out" ] && return
  log "converting $hf to GGUF"
  mkdir -p "$(dirname "$out")"
  # Checkpoints written by newer transformers list `extra_special_tokens`,
  # which the pinned one reads as a mapping: convert from a copy (links, and
  # that one file rewritten) where the list is dropped (the same tokens stay
  # in `additional_special_tokens` and the tokenizer itself).
  if python3 -c "import json,sys; sys.exit(not isinstance(json.load(open('$hf/tokenizer_config.json')).get('extra_special_tokens'), list))" 2>/dev/null; then
    convert_from="$WORK/hf/$name"
    rm -rf "$convert_from" && mkdir -p "$convert_from"
    for f in "$hf"/*; do ln -s "$f" "$convert_from/"; done
    rm "$convert_from/tokenizer_config.json"
    python3 -c "import json; d=json.load(open('$hf/tokenizer_config.json')); d.pop('extra_special_tokens'); json.dump(d, open('$convert_from/tokenizer_config.json','w'))"
  else
    convert_from=$hf
  fi
  # Small trained tokenizers are not ones llama.cpp knows by hash; their
  # pre-tokenizer is declared `qwen2` (as for ../shared/anchors).
  "$VENV/bin/python" - "$SRC" "$convert_from" "$out.part" > "$WORK/convert-$name.log" 2>&1 <<'EOF'
import runpy, sys
src, model, out = sys.argv[1:]
sys.path[:0] = [src, f"{src}/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "bf16", "--outfile", out]
# Qwen3.5 expects multi-token-prediction layers unless told there are none.
import json
if json.load(open(f"{model}/config.json"))["model_type"].startswith("qwen3_5"):
    sys.argv.append("--no-mtp")
runpy.run_path(f"{src}/convert_hf_to_gguf.py", run_name="__main__")
EOF
  mv "$out.part" "$out"
}
