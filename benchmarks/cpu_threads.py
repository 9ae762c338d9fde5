"""The bundled job (`emag generate`) with one CPU thread and with torch's default, alone and beside a
competing process: why small models run on one thread (emag.threads).

    python benchmarks/cpu_threads.py --out benchmarks/results/cpu_threads.txt

Each setting runs `emag generate --out <fresh folder>` (the README's first command; `--num-images`
and `--steps` to shorten it) as its own process and is timed by wall clock. A competitor is another
process that keeps one core busy (a Python loop), as any other program on a user's machine would;
`--competitors 0 1 2` runs each thread count alone, beside one and beside two of them (started before
and stopped after each run).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

BUSY = [sys.executable, "-c", "while True: pass"]


def run_job(threads: int, busy: int, num_images: int, steps: int | None, folder: str) -> float:
    cmd = [sys.executable, "-m", "emag.cli", "generate", "--out", folder, "--threads", str(threads),
           "--num-images", str(num_images)]
    if steps:
        cmd += ["--steps", str(steps)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    competitors = [subprocess.Popen(BUSY) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0.0)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start
    finally:
        for c in competitors:
            c.kill()
            c.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=6, help="per class (6: the README's job, 60 images)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the preset's 25)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                    help="thread counts to compare (default: 1 and the number of cores, torch's default)")
    ap.add_argument("--competitors", type=int, nargs="+", default=[0, 1, 2],
                    help="numbers of busy processes to run beside the job (default: 0 1 2)")
    ap.add_argument("--out", default=None, help="write the table here too")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for busy in args.competitors:
            for threads in args.threads:
                folder = os.path.join(tmp, f"t{threads}-c{busy}")
                seconds = run_job(threads, busy, args.num_images, args.steps, folder)
                rows.append((threads, busy, seconds))
                print(f"threads {threads}, {busy} competing process(es): {seconds:.1f} s", flush=True)
    one = {busy: s for t, busy, s in rows if t == 1}
    lines = [
        f"# python benchmarks/cpu_threads.py --num-images {args.num_images}"
        + (f" --steps {args.steps}" if args.steps else "") + f" --threads {' '.join(map(str, args.threads))}"
        + f" --competitors {' '.join(map(str, args.competitors))}",
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; `emag generate` (bundled digits "
        f"model, {args.num_images * 10} images), wall clock of the whole command; a competitor: one busy Python process",
        "| threads | competing processes | seconds | x one thread, same load |",
        "|---|---|---|---|",
    ]
    for threads, busy, seconds in rows:
        lines.append(f"| {threads} | {busy} | {seconds:.1f} | {seconds / one[busy]:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
