"""Start-up cost of the `rapbot` command line: seconds and modules imported.

Measures, in fresh interpreters and in one run: the bare interpreter (the baseline),
`rapbot --help`, `rapbot concepts` on a store (store-only: no model library), and, for
scale, what a model-loading command pays just to import open_clip (which imports torch).
Prints the median of N runs and each as a ratio to the baseline.

    python benchmarks/bench_cli_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _setup import ROOT, scratch_dir

MODEL_LIBRARIES = ("torch", "open_clip", "ultralytics", "transformers")


def timed(argv: list[str], env: dict[str, str], runs: int) -> float:
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, check=True)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def imported(argv: list[str], env: dict[str, str]) -> set[str]:
    done = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], env=env, cwd=ROOT, capture_output=True, text=True
    )
    return {
        line.split("|")[-1].strip() for line in done.stderr.splitlines() if "import time:" in line
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    data = scratch_dir("cli-startup") / "data"
    env = {**os.environ, "RAPBOT_DATA_DIR": str(data), "RAPBOT_PROFILE": "tiny"}
    env.update(HF_HUB_OFFLINE="1", YOLO_OFFLINE="1")
    py = sys.executable
    cases = {
        "python -c pass (baseline)": [py, "-c", "pass"],
        "rapbot --help": [py, "-m", "rapbot.cli", "--help"],
        "rapbot concepts": [py, "-m", "rapbot.cli", "concepts"],
        "import open_clip (what loading models starts with)": [py, "-c", "import open_clip"],
    }
    subprocess.run(cases["rapbot concepts"], env=env, cwd=ROOT, capture_output=True, check=True)
    baseline = None
    print(f"median of {runs} runs; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for name, argv in cases.items():
        seconds = timed(argv, env, runs)
        baseline = baseline or seconds
        modules = imported(argv, env)
        heavy = sorted(set(MODEL_LIBRARIES) & modules)
        print(
            f"{name:52s} {seconds:6.2f} s  {seconds / baseline:6.1f}x baseline"
            f"  {len(modules):5d} modules  model libraries: {', '.join(heavy) or 'none'}"
        )


if __name__ == "__main__":
    main()
