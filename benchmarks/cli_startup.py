"""How fast the command line answers: `polyrot --help`, a stage's help and a mistyped option, each
against `python -c pass` (the interpreter's own start-up) in the same run.

The commands take turns round by round, so load from other processes falls on all of them alike;
the table gives each one's median wall time and the median ratio to `python -c pass` of the same
round. The 1-minute load average is printed before and after.

    .venv/bin/python benchmarks/cli_startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "polyrot --help": ["polyrot", "--help"],
    "polyrot train-seed --help": ["polyrot", "train-seed", "--help"],
    "polyrot train-seed --bogus 1": ["polyrot", "train-seed", "--bogus", "1"],
}


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (after one untimed warm-up)")
    args = parser.parse_args()
    # The venv's own entry point, whatever PATH says.
    polyrot = shutil.which("polyrot", path=os.path.dirname(sys.executable)) or "polyrot"
    commands = {label: [polyrot, *argv[1:]] if argv[0] == "polyrot" else argv for label, argv in COMMANDS.items()}

    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for argv in commands.values():  # warm the file cache once
        wall(argv)
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(args.rounds):
        for label, argv in commands.items():
            times[label].append(wall(argv))
    base = times["python -c pass"]
    print(f"{'command':32s} {'median s':>9s} {'x python -c pass (median of rounds)':>36s}")
    for label, values in times.items():
        ratio = statistics.median(v / b for v, b in zip(values, base))
        print(f"{label:32s} {statistics.median(values):9.3f} {ratio:36.1f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
