"""Where sae_guard keeps files it derives at run time (tokenizer files, assembled pipelines).

`$SAE_GUARD_CACHE` when set, else `<tmp>/sae-guard-cache`. Everything in it can be rebuilt from the
installed packages, so deleting it is always safe.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SAE_GUARD_CACHE", Path(tempfile.gettempdir()) / "sae-guard-cache"))
