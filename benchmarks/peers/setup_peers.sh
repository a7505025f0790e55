#!/usr/bin/env bash
# Create (or refresh) the peer-library venv holding EleutherAI sparsify
# (`eai-sparsify`, import `sparsify`) and SAELens (`sae-lens`, import `sae_lens`).
#
# Used by tests/fixtures/make_interop_fixtures.py and benchmarks/peers/peer_speed.py.
# It is NOT sae_guard's own environment and nothing in sae_guard imports these.
#
#   bash benchmarks/peers/setup_peers.sh          # venv at <repo>/.venv-peers
#   PEERS_VENV=/tmp/peers bash benchmarks/peers/setup_peers.sh
#   PYTHON=python3.11 bash benchmarks/peers/setup_peers.sh
#
# Idempotent: a stamp file inside the venv records the hash of requirements.txt;
# when it matches and the imports still work, nothing is installed.
# Needs only PyPI (torch==2.14.1 is pinned; on the development machines its
# wheel comes from local disk). A fresh install took ~2 min on the dev machine
# (2 cores), mostly unpacking torch's CUDA wheels; the venv is ~6.3 GB.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

VENV="${PEERS_VENV:-.venv-peers}"
PYTHON="${PYTHON:-python3}"
REQ="benchmarks/peers/requirements.txt"
TORCH_PIN="torch==2.14.1"
STAMP="$VENV/.sae_guard_peers_stamp"

start=$(date +%s)

req_hash="$(sha256sum "$REQ" | cut -d' ' -f1)"

check_imports() {
    "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch, sparsify, sae_lens  # noqa: F401
assert torch.__version__.split("+")[0] == "2.14.1", torch.__version__
print(f"torch {torch.__version__}, eai-sparsify {md.version('eai-sparsify')}, "
      f"sae-lens {md.version('sae-lens')}")
EOF
}

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$req_hash" ]]; then
    if check_imports 2>/dev/null; then
        echo "peer venv $VENV is up to date (nothing to do)"
        exit 0
    fi
    echo "peer venv $VENV has a stamp but its imports fail; reinstalling"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating venv $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

# torch is pinned on the command line as well as in the requirements so that no
# resolver path can pick another (multi-GB) torch build.
"$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    "$TORCH_PIN" -r "$REQ"

check_imports
echo "$req_hash" > "$STAMP"
echo "peer venv ready at $VENV in $(( $(date +%s) - start ))s"
