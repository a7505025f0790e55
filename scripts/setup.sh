#!/usr/bin/env bash
# Create .venv (once) with the pinned stack from constraints.txt and sae_guard installed editable.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SAE_GUARD_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
fi
if ! "$VENV/bin/python" -c "import sae_guard, pytest" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.installed" ] || [ constraints.txt -nt "$VENV/.installed" ]; then
  "$VENV/bin/pip" install --quiet -c constraints.txt -e ".[test]"
  touch "$VENV/.installed"
fi
