"""Does ``torch.compile`` pay for the residual functions? Eager against compiled F, side by side.

Times the no-grad evaluation of Example 1's ten residual functions (state 2,
width 100, batch 51, one thread) eagerly, then compiles them (reporting the
compile time) and times compiled and eager calls again, interleaved.

    TMPDIR=$PWD/.tmp python benchmarks/bench_compile.py [--calls 200]

TMPDIR keeps inductor's cache inside the project. Not a test: nothing asserts.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from irnet.nets import MLPResidual  # noqa: E402


def per_call_us(functions, x, calls: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(calls):
            for f in functions:
                f(x)
    return (time.perf_counter() - start) / (calls * len(functions)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls of each F per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurements")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    eager = [MLPResidual(2, 100, 1.0) for _ in range(10)]
    compiled = [MLPResidual(2, 100, 1.0) for _ in range(10)]
    x = torch.randn(51, 2)
    start = time.perf_counter()
    for F in compiled:
        F.compile()
        with torch.no_grad():
            F(x)
    compile_s = time.perf_counter() - start
    rounds = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        rounds["eager"].append(per_call_us(eager, x, args.calls))
        rounds["compiled"].append(per_call_us(compiled, x, args.calls))
    e, c = statistics.median(rounds["eager"]), statistics.median(rounds["compiled"])
    print(f"compile time for 10 residual functions: {compile_s:.1f} s")
    print("| F call (no grad) | µs, median of rounds | / eager |\n|---|---:|---:|")
    print(f"| eager | {e:.0f} | 1.00× |\n| compiled | {c:.0f} | {c / e:.2f}× |")


if __name__ == "__main__":
    main()
