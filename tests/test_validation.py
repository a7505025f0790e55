"""Startup: `import sae_guard` and `sae-guard --help` load no heavy library; the public API still resolves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "transformers", "diffusers", "safetensors")


def _modules_after(code: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    probe = code + "\nimport sys; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    return set(done.stdout.split())


def test_import_sae_guard_loads_no_heavy_library():
    assert not _modules_after("import sae_guard") & set(HEAVY)


def test_cli_help_loads_no_heavy_library():
    code = ("import sys\nsys.argv = ['sae-guard', '--help']\nfrom sae_guard.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass")
    assert not _modules_after(code) & set(HEAVY)


def test_public_names_resolve_lazily():
    import sae_guard
    from sae_guard import SAE, Concept, Edit, Guard, guard, harvest, train
    from sae_guard.sae.base import SAE as SAEClass

    assert SAE is SAEClass and callable(guard) and callable(harvest) and Concept and Edit and Guard
    assert callable(train) and callable(sae_guard.train)  # the function, not hidden by its subpackage
    assert set(sae_guard.__all__) <= set(dir(sae_guard))
    try:
        sae_guard.no_such_name
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")
