"""Startup time: `import sae_guard` and `sae-guard --help` against `import torch` and a bare interpreter.

Each is timed in a fresh interpreter (wall clock of the whole process, median of --repeats), so the figures are
what a user waits for. The goal (issue 13) is under a second for both; the package reaches it by importing its
public names lazily (sae_guard/__init__.py) and the CLI by importing heavy modules inside its commands, so
neither loads torch. The last column says whether torch ended up imported.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python (bare interpreter)": "pass",
    "import torch": "import torch",
    "import sae_guard": "import sae_guard",
    "sae-guard --help": "import sys; sys.argv = ['sae-guard', '--help']\n"
                        "from sae_guard.cli import main\n"
                        "try:\n    main()\nexcept SystemExit:\n    pass",
    "from sae_guard import SAE (loads torch)": "from sae_guard import SAE",
}
PROBE = "\nimport sys; print('torch' in sys.modules, file=sys.stderr)"


def timed(code: str) -> tuple[float, bool]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code + PROBE], capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stderr.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'case':42} {'median s':>9} {'min s':>7}  torch imported")
    for name, code in CASES.items():
        runs = [timed(code) for _ in range(args.repeats)]
        seconds = [s for s, _ in runs]
        print(f"{name:42} {statistics.median(seconds):9.3f} {min(seconds):7.3f}  {runs[-1][1]}")


if __name__ == "__main__":
    main()
