"""How long a new process takes to `import sae_guard` and to print `sae-guard --help`, beside `import torch`.

    python benchmarks/startup.py [--runs 5]

Each figure is the median wall time of fresh interpreter processes (so nothing is cached in-process); `import
torch` is the floor the package's lazy imports keep it under.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import sae_guard": [sys.executable, "-c", "import sae_guard"],
    "sae-guard --help": [sys.executable, "-c", "import sys; sys.argv = ['sae-guard', '--help']; "
                                              "from sae_guard.cli import main; main()"],
    "import sae_guard; sae_guard.SAE": [sys.executable, "-c", "import sae_guard; sae_guard.SAE"],
    "import torch": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"{'command':36} {'median s':>9} {'min s':>7}")
    for name, command in COMMANDS.items():
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        print(f"{name:36} {statistics.median(times):9.3f} {min(times):7.3f}")


if __name__ == "__main__":
    main()
