"""Benchmark prepare.py on a large input: throughput (MB/s) and peak memory (RSS).

    python bench_prepare.py --size_mb 100

Builds an input of at least --size_mb MB (tiny Shakespeare repeated) in a temporary
folder, runs `python prepare.py --input ... --tokenizer gpt2` on it in a subprocess, and
prints MB of input per second of wall time and the subprocess's peak RSS. The targets and
measured figures are in docs/speed.md.
"""
import errors
errors.starting(__name__)  # a missing requirement: one line, no traceback
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from errors import UserError, run_main

try:
    import resource  # POSIX: the children's exact peak RSS and CPU time
except ImportError:  # Windows: sampled through psutil instead
    resource = None

ROOT = Path(__file__).resolve().parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def run_measured(cmd: list[str]) -> tuple[str, int, float, float]:
    """Run cmd; return its output, exit code, peak RSS in MB and CPU seconds. POSIX reports the
    largest process's peak exactly; elsewhere the whole process tree is sampled while it runs."""
    if resource is not None:
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8")
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        scale = 1e6 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return result.stdout, result.returncode, usage.ru_maxrss / scale, usage.ru_utime + usage.ru_stime
    # no getrusage: sample the process tree's memory while it runs
    with tempfile.TemporaryFile("w+", encoding="utf-8") as out:
        proc = psutil.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        peak, cpu = 0, 0.0
        while proc.poll() is None:
            try:
                tree = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
                cpu = max(cpu, sum(sum(p.cpu_times()[:2]) for p in tree))
            except psutil.Error:  # a worker ended between the listing and the reading
                pass
            time.sleep(0.05)
        out.seek(0)
        return out.read(), proc.returncode, peak / 1e6, cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size_mb", type=float, default=100,
                   help="input size in MB (10^6 bytes): the source text repeated whole until it reaches this size")
    p.add_argument("--tokenizer", default="gpt2", help="tokenizer passed to prepare.py")
    p.add_argument("--source", default=str(SHAKESPEARE), help="text repeated to build the input")
    p.add_argument("prepare_args", nargs="*", help="extra prepare.py flags, after --")
    args = p.parse_args(argv)
    if not args.size_mb > 0:
        raise UserError(f"--size_mb must be above 0, got {args.size_mb:g}")
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
        output, code, peak_mb, cpu_seconds = run_measured(cmd)
        seconds = time.perf_counter() - t0
        if code != 0:
            raise UserError(f"prepare.py failed:\n{output}")
        print(output.strip())
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    # CPU time shows the cost even when other processes share the cores (wall time does not)
    print(f"input {size / 1e6:.1f} MB in {seconds:.1f} s: {size / 1e6 / seconds:.1f} MB/s wall, "
          f"{cpu_seconds:.1f} CPU-s ({size / 1e6 / cpu_seconds:.1f} MB per CPU-second), "
          f"peak RSS {peak_mb:.0f} MB, {os.cpu_count()} CPUs, load average {load}")


if __name__ == "__main__":
    run_main(main)
