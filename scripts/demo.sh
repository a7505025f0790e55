#!/usr/bin/env bash
# The main job on the embedded default: erase `red` from the shipped ShapesWorld text-to-image model
# (no network, no GPU). Writes demo/report.html and demo/metrics.json; extra arguments go to `sae-guard demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${SAE_GUARD_VENV:-.venv}/bin/sae-guard" demo --out demo "$@"
