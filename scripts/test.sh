#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite: everything but the `slow` and `gpu` markers.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -m "not slow and not gpu" "$@"
