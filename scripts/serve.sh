#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and serves the demo MoE + draft with adaptive speculation over an
# OpenAI-compatible HTTP API on a local Ray instance. Extra arguments go to `python -m cluster.cli serve`
# (for example --port 8001, or --config cluster/configs/gpu.yaml --address auto on a Ray cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m cluster.cli serve "$@"
