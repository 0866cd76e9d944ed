"""Start-up time of the command line against a bare Python, in one process.

Run: ``python benchmarks/cli_startup.py [--repeats 5]``. Prints the median wall time of
``python -c pass``, ``nnshrink --version``, ``nnshrink compress --help`` and ``import torch``
(what every call cost before commands imported torch themselves), each as a ratio against the
bare interpreter.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

ENTRY = "import sys; from nnshrink.entry import main; sys.argv[0] = 'nnshrink'; sys.exit(main())"
CASES = {"python -c pass": ["-c", "pass"], "nnshrink --version": ["-c", ENTRY, "--version"],
         "nnshrink compress --help": ["-c", ENTRY, "compress", "--help"], "python -c 'import torch'": ["-c", "import torch"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times = {}
    for label, argv in CASES.items():
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, *argv], check=True, capture_output=True)
            runs.append(time.perf_counter() - t)
        times[label] = statistics.median(runs)
    base = times["python -c pass"]
    for label, t in times.items():
        print(f"{label:28s} {1e3 * t:8.1f} ms  {t / base:6.1f}x python -c pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
