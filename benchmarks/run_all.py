"""Run every benchmark script in this folder, one after another (`make bench`). Extra arguments (e.g. --quick) are
passed to each script. Tables go to stdout, plots to benchmarks/results/."""

import subprocess
import sys
from pathlib import Path


def main() -> int:
    here = Path(__file__).resolve().parent
    status = 0
    for script in sorted(here.glob("bench_*.py")):
        print(f"\n===== {script.name} =====", flush=True)
        status |= subprocess.call([sys.executable, str(script), *sys.argv[1:]])
    return status


if __name__ == "__main__":
    sys.exit(main())
