#!/usr/bin/env bash
# Set up (once) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${SAE_GUARD_VENV:-.venv}/bin/python" -m pytest "$@"
