"""Benchmark prepare.py on a large input: throughput (MB/s) and peak memory (RSS).

    python bench_prepare.py --size_mb 100

Builds an input of at least --size_mb MB (tiny Shakespeare repeated) in a temporary
folder, runs `python prepare.py --input ... --tokenizer gpt2` on it in a subprocess, and
prints MB of input per second of wall time and the subprocess's peak RSS. Targets:
>= 20 MB/s on 2 cores, and a peak RSS under 500 MB whatever the input size.
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from errors import UserError, run_main

ROOT = Path(__file__).resolve().parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size_mb", type=float, default=100, help="input size in MB (10^6 bytes)")
    p.add_argument("--tokenizer", default="gpt2", help="tokenizer passed to prepare.py")
    p.add_argument("--source", default=str(SHAKESPEARE), help="text repeated to build the input")
    p.add_argument("prepare_args", nargs="*", help="extra prepare.py flags, after --")
    args = p.parse_args(argv)
    source = Path(args.source)
    if not source.is_file():
        raise UserError(f"benchmark text not found: {source}; pass --source PATH")
    text = source.read_bytes()

    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "input.txt"
        with open(big, "wb") as f:
            while f.tell() < args.size_mb * 1e6:
                f.write(text)
        size = big.stat().st_size
        cmd = [sys.executable, str(ROOT / "prepare.py"), "--input", str(big), "--name", "bench",
               "--tokenizer", args.tokenizer, "--data_dir", str(Path(tmp) / "data"), *args.prepare_args]
        print(" ".join(cmd))
        t0 = time.perf_counter()
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - t0
        if result.returncode != 0:
            raise UserError(f"prepare.py failed:\n{result.stdout}")
        print(result.stdout.strip())
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mb = usage.ru_maxrss / 1024  # Linux reports KiB
    cpu_seconds = usage.ru_utime + usage.ru_stime
    # CPU time shows the cost even when other processes share the cores (wall time does not)
    print(f"input {size / 1e6:.1f} MB in {seconds:.1f} s: {size / 1e6 / seconds:.1f} MB/s wall, "
          f"{cpu_seconds:.1f} CPU-s ({size / 1e6 / cpu_seconds:.1f} MB per CPU-second), "
          f"peak RSS {peak_mb:.0f} MB, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    run_main(main)
