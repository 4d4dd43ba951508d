"""Device and precision, chosen once for every script, with the reason printed.

device "auto": cuda, then mps, then cpu.
dtype "auto": the fastest safe choice for that device
  - cuda with bf16 support   -> bfloat16 autocast
  - older cuda               -> float16 autocast with a GradScaler
  - cpu with AMX or AVX512-BF16 (native bf16 matrix units) -> bfloat16 autocast,
    several times faster than float32 there
  - mps (Apple silicon) on macOS 14 or newer -> bfloat16 autocast: torch runs bf16 on MPS
    from macOS 14 on, and bf16 needs no GradScaler; on older macOS -> float32 (MPS has no
    bf16 there, and float16 would need a GradScaler)
  - anything else (older cpus, Apple's arm CPUs) -> float32

The CPU's features come from torch's own detection (cpuinfo), which works on Linux, Windows
and macOS alike and answers False for x86 features on arm CPUs; nothing here reads /proc.
"""
import contextlib
import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

import durable
from errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cpu_supports(name: str) -> bool:
    """torch.cpu's private feature check `name`, False where this torch build lacks it."""
    check = getattr(torch.cpu, name, None)
    return check is not None and check()


@functools.cache
def cpu_has_amx() -> bool:
    """True when this CPU has AMX tiles (Intel Xeon, 4th generation on)."""
    return _cpu_supports("_is_amx_tile_supported")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (x86 AMX or AVX512-BF16)."""
    return cpu_has_amx() or _cpu_supports("_is_avx512_bf16_supported")


def mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def mps_dtype(macos: str) -> tuple[str, str]:
    """(dtype, reason) for dtype auto on MPS, given the macOS version ("14.5")."""
    try:
        major = int(macos.split(".")[0])
    except ValueError:
        major = 0
    if major >= 14:
        return "bfloat16", f"macOS {macos} runs bf16 on MPS; no GradScaler needed"
    return "float32", f"macOS {macos or '?'} has no bf16 on MPS (it needs macOS 14); float16 would need a GradScaler"


def user_cache(name: str) -> Path:
    """A folder of the user's cache ($XDG_CACHE_HOME, else ~/.cache) for what this toolkit
    builds once per machine: compiled decode steps, the C dropout kernels."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "nanogpt-toolkit" / name


CACHE_KEEP_DAYS = 30  # a build in the cache that no process has used for this long is removed


def mark_used(path: Path):
    """Note that a file of the cache was used now (its modification time), so that
    prune_cache keeps it. A read-only cache is no error."""
    try:
        os.utime(path)
    except OSError:
        pass


def prune_cache(path: Path, pattern: str):
    """After a new build at path: remove the files of its folder matching pattern (its other
    builds: other versions of the code, model shapes, CPUs sharing the folder) that no process
    has used for CACHE_KEEP_DAYS days, so that upgrades do not pile builds up. What cannot be
    removed (in use on Windows, another user's) stays."""
    cutoff = time.time() - CACHE_KEEP_DAYS * 86400
    for other in path.parent.glob(pattern):
        try:
            if other != path and other.stat().st_mtime < cutoff:
                other.unlink()
        except OSError:
            pass


def failure_noted(marker: Path, max_age: float, context: dict) -> str | None:
    """Why a build failed, as note_failure kept it beside where its result would be, if that was
    less than max_age seconds ago in the same context (the compiler, the Python environment);
    else None: no note, an unreadable or old one, or another context's is no reason not to try."""
    try:
        if time.time() - marker.stat().st_mtime > max_age:
            return None
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or {k: record.get(k) for k in context} != context:
        return None
    return str(record.get("why", "unknown"))


def note_failure(marker: Path, why: str, context: dict):
    """Keep why a build failed, in its context, for failure_noted. A cache that cannot be written
    is no error: the next run tries again."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        durable.write_text(marker, json.dumps({"why": why, **context}) + "\n")
    except OSError:
        pass


def available_memory() -> int:
    """Bytes this machine can still give a process without swapping (psutil: every OS)."""
    return psutil.virtual_memory().available


@dataclass
class Precision:
    device: str  # "cuda", "cuda:1", "mps" or "cpu"
    dtype: str  # "float32", "bfloat16" or "float16": the autocast dtype (float32 = no autocast)
    reason: str  # why this device and dtype were chosen, printed once

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def autocast(self):
        """Context for forward passes: autocast to dtype, or nothing for float32."""
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.torch_dtype)

    def synchronize(self):
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        elif self.device_type == "mps":
            torch.mps.synchronize()


def resolve(device: str = "auto", dtype: str = "auto") -> Precision:
    """Pick the device and dtype, checking that an explicit choice can run here."""
    why = []
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif mps_available():
            device = "mps"
        else:
            device = "cpu"
        gpu = {"cuda": "a CUDA GPU", "mps": "the Apple silicon GPU", "cpu": "no GPU found"}[device]
        why.append(f"device {device} ({gpu}: best available)")
    else:
        kind = device.split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but CUDA is not available here; use --device=auto or --device=cpu")
        if kind == "mps" and not mps_available():
            raise UserError(f"device {device!r} requested but MPS is not available here; use --device=auto or --device=cpu")
        if kind not in ("cuda", "mps", "cpu"):
            raise UserError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
        why.append(f"device {device} (as requested)")
    kind = device.split(":")[0]

    if dtype == "auto":
        if kind == "cuda":
            if torch.cuda.is_bf16_supported():
                dtype, because = "bfloat16", "this GPU supports bf16"
            else:
                dtype, because = "float16", "this GPU lacks bf16; float16 with a GradScaler"
        elif kind == "cpu" and cpu_has_native_bf16():
            dtype, because = "bfloat16", "this CPU has native bf16 (AMX/AVX512-BF16)"
        elif kind == "cpu":
            dtype, because = "float32", "this CPU has no native bf16, autocast would be slower"
        else:
            dtype, because = mps_dtype(platform.mac_ver()[0])
        why.append(f"dtype {dtype} ({because})")
    elif dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    elif kind == "cpu" and platform.machine().lower() in ("x86_64", "amd64") and (  # (what torch can tell)
            dtype == "float16" and not _cpu_supports("_is_amx_fp16_supported")
            or dtype == "bfloat16" and not cpu_has_native_bf16()):
        why.append(f"dtype {dtype} (as requested; this CPU has no {dtype} units: emulated, slower than "
                   f"--dtype=auto)")
    else:
        why.append(f"dtype {dtype} (as requested)")
    return Precision(device, dtype, ", ".join(why))


SEED_LIMIT = 2**63  # torch keeps seeds in 64 bits, but some of its paths read them signed


def seed_problem(seed: int) -> str | None:
    """The one line a --seed torch cannot take gets (it would overflow deep inside torch), else None."""
    if not 0 <= seed < SEED_LIMIT:
        return f"--seed must be between 0 and {SEED_LIMIT - 1}, got {seed}"
    return None


def set_determinism(on: bool, device_type: str) -> bool:
    """train.py --deterministic: torch's deterministic kernels on a GPU, where the backward
    passes of embeddings and attention otherwise add with atomics in whatever order the threads
    arrive, so two runs of one seed differ in their last bits. A CPU run is reproducible without
    them, so there the mode stays off (it would also fill every new tensor with NaN first).
    cuBLAS needs its fixed workspace before its first product. Returns whether the mode is on."""
    on = on and device_type != "cpu"
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)
    return on


def keep_freed_memory(keep: bool = True) -> bool:
    """Linux with glibc: have malloc keep the memory of freed tensors for the next ones
    (keep=False: glibc's usual behaviour, about as it settles in a long run). A training step
    allocates and frees the same large activations every step; glibc maps each one above its
    threshold (at most 32 MB) anew and unmaps it when freed, so the next step faults its pages
    in again, each one zeroed by the kernel: about 100,000 page faults (400 MB zeroed) a bf16
    step at the shakespeare shape, about a thousand when kept. The process then keeps its peak
    memory (it reaches it every step anyway). Returns whether it applied; elsewhere (macOS, Windows,
    musl) nothing changes. docs/speed.md has the measurements."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):  # no os.confstr (Windows), not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
    if keep:  # no mmap for any size, and no trimming of the heap's top below 1 GiB
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    done = (libc.mallopt(M_MMAP_MAX, 65536) and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            and libc.mallopt(M_TRIM_THRESHOLD, 64 << 20))  # the largest threshold glibc moves itself to
    libc.malloc_trim(0)  # what was kept goes back, so large tensors are mapped anew again
    return bool(done)


def set_cpu_threads():
    """Use every core for intra-op work unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
