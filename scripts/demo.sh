#!/usr/bin/env bash
# The main job on the embedded default: SAE quality on planted dictionaries (no network, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${SAE_GUARD_VENV:-.venv}/bin/python" benchmarks/sae_quality.py --data flat "$@"
