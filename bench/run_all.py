"""Run every benchmark and print the table for ``bench/RESULTS.md``.

    COMFYUI_PATH=/path/to/ComfyUI python bench/run_all.py                  # tiny model, CPU: ~10 min on 2 cores
    COMFYUI_PATH=/path/to/ComfyUI python bench/run_all.py --sd15           # + the SD1.5-size figures (CPU: slow)
    COMFYUI_PATH=/path/to/ComfyUI python bench/run_all.py --device cuda --sd15 --no-tiny   # bench/gpu_run.sh
    COMFYUI_PATH=/path/to/ComfyUI python bench/run_all.py --only nti pnd --repeats 5

Each benchmark runs in its own process (``bench_*.py``; run one alone for its full options and output),
prints its figures as it goes, and ends with a machine-readable line that this script collects. The table
gives each figure's min and median over repeats, its goal and whether the median meets it. Ratios are
measured within one process, the variants interleaved, each ratio from one pair of runs: quote ratios,
not absolute times (the machines are shared). A benchmark that fails is reported with its last output
lines and the others still run; the exit status is 1 then.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULT_TAG  # noqa: E402


def jobs(args) -> list[tuple[str, list[str]]]:
    """(name, command-line arguments) of each benchmark run, tiny model first, then SD1.5 size if asked."""
    dev = ["--device", args.device]
    rep = lambda default: ["--repeats", str(args.repeats or default)]
    tiny = [
        ("capture", ["bench_capture.py", *dev, *rep(5)]),
        ("nti", ["bench_nti.py", *dev, "--steps", "10", "20", *rep(2)]),
        ("pnd", ["bench_pnd.py", *dev, "--steps", "50", *rep(3)]),
        ("lnr", ["bench_lnr.py", *dev, "--steps", "50", *rep(3)]),
        ("palp", ["bench_palp.py", *dev, "--measure", "time", *rep(3)]),                     # 64 px
        ("palp", ["bench_palp.py", *dev, "--measure", "memory", "--res", "256"]),            # deterministic
        ("checkpointing", ["bench_checkpointing.py", *dev, "--res", "128", "--keep", "0.5", "1", "2", *rep(3)]),
    ]
    if args.tiny is False:
        tiny = []
    if not args.sd15:
        return tiny
    if args.device == "cuda":
        # sized for one 15-minute GPU lease (~6 min in all on an H100/H200), most wanted first
        sd15 = [
            ("pnd", ["bench_pnd.py", *dev, "--size", "sd15", "--steps", "50", "--res", "512", *rep(2), "--trials"]),
            # the half-precision trials are in RESULTS (first lease), TF32 products are not; on fp16 weights the
            # per-layer cast is timed, and a profile of ours and the reference says where the rest of the first
            # lease's 1.51x goes
            ("nti", ["bench_nti.py", *dev, "--size", "sd15", "--steps", "10", "--res", "512", *rep(1), "--profile",
                     "--compute-dtypes", "float32", "tf32"]),
            ("palp", ["bench_palp.py", *dev, "--size", "sd15", "--res", "512", "--steps", "10",
                      "--measure", "time", "memory", *rep(2)]),
            ("lnr", ["bench_lnr.py", *dev, "--size", "sd15", "--steps", "50", "--res", "512", *rep(2)]),
            ("capture", ["bench_capture.py", *dev, "--size", "sd15", "--steps", "20", "--res", "512", *rep(2)]),
            ("checkpointing", ["bench_checkpointing.py", *dev, "--size", "sd15", "--res", "512", "--keep", "0.5", "1",
                               "2", *rep(3)]),
        ]
    else:
        # on the CPU only what finishes in minutes: memory counts (deterministic) and the capture ratio
        threads = ["--threads", str(os.cpu_count())]
        sd15 = [
            ("capture", ["bench_capture.py", *dev, "--size", "sd15", "--steps", "4", "--res", "256", *threads, *rep(3)]),
            # ~15 min on 2 busy cores: one layout and one appearance step (no warm-up: the same counts)
            ("pnd", ["bench_pnd.py", *dev, "--size", "sd15", "--steps", "10", "--res", "256", *threads, *rep(1),
                     "--measure", "memory", "--checkpointing", "on", "--no-memory-warmup"]),
            ("palp", ["bench_palp.py", *dev, "--size", "sd15", "--res", "256", "--measure", "memory", *rep(1)]),
        ]
    return tiny + [(name + " sd15", argv) for name, argv in sd15]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, {cpu} "
            f"({os.cpu_count()} logical CPUs), GPU {gpu}, torch {torch.__version__}, Python {platform.python_version()}")


def met(value: float, goal: str) -> str:
    match = re.fullmatch(r"\s*(<=|>=)\s*(-?[\d.]+)\s*", goal or "")
    if not match:
        return ""
    bound = float(match.group(2))
    return "yes" if (value <= bound if match.group(1) == "<=" else value >= bound) else "**no**"


def run(name: str, argv: list[str], timeout: float) -> tuple[list[dict], str | None]:
    """One benchmark process; its figures are printed as it prints them (a run stopped at ``timeout`` keeps what
    it printed so far: a GPU lease is short)."""
    command = [sys.executable, "-u", str(HERE / argv[0]), *argv[1:]]
    print(f"\n=== {name}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
        lines = []

        def relay():
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if not line.startswith(RESULT_TAG):
                    print("   " + lines[-1], flush=True)
        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join(5)
            return [], f"timed out after {timeout:.0f} s (what it printed is above)"
        reader.join()
        errors.seek(0)
        stderr = errors.read()
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    rows = [row for line in lines if line.startswith(RESULT_TAG) for row in json.loads(line[len(RESULT_TAG):])["rows"]]
    if proc.returncode != 0 or not rows:
        tail = "\n".join((stderr or "\n".join(lines)).splitlines()[-60:])
        return rows, f"exit status {proc.returncode}:\n{tail}"
    return rows, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sd15", action="store_true", help="also the SD1.5-size figures (random weights)")
    ap.add_argument("--no-tiny", dest="tiny", action="store_false", help="skip the tiny-model figures")
    ap.add_argument("--only", nargs="+", choices=["capture", "nti", "pnd", "lnr", "palp", "checkpointing"],
                    help="run only these benchmarks")
    ap.add_argument("--repeats", type=int, help="repeats of every benchmark (default: each one's own)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each benchmark process")
    args = ap.parse_args()
    if not args.tiny and not args.sd15:
        ap.error("--no-tiny leaves nothing to run without --sd15")
    if "COMFYUI_PATH" not in os.environ:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout: the benchmarks load the real host in-process")

    table, failures = [], []
    start = time.perf_counter()
    for name, argv in jobs(args):
        if args.only and name.split()[0] not in args.only:
            continue
        rows, error = run(name, argv, args.timeout)
        table += [(name, row) for row in rows]
        if error:
            failures.append(name)
            print(f"   FAILED: {error}")

    print(f"\n## Results ({machine()}; {time.perf_counter() - start:.0f} s)\n")
    print("| bench | figure | min | median | goal | met |")
    print("|---|---|---|---|---|---|")
    for name, row in table:
        values = row["values"]
        lo, med = (values[0], values[0]) if len(values) == 1 else values
        single = len(values) == 1
        note = f" ({row['note']})" if row.get("note") else ""
        print(f"| {name} | {row['what']}{note} | {'' if single else f'{lo:.3g}'} | {med:.3g} | {row['goal']} | "
              f"{met(med, row['goal'])} |")
    if failures:
        print(f"\nFAILED: {', '.join(failures)} (see above)")
        sys.exit(1)


if __name__ == "__main__":
    main()
