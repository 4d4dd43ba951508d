"""CPU kernels for training: fast dropout masks and chunked causal attention with its backward.

torch's CPU dropout draws its mask with bernoulli_ (slow per element), and SDPA with
dropout_p > 0 leaves the fused flash kernel for an unfused math path over full-size
temporaries: at the Shakespeare shape that made a bf16 training step several times slower at
dropout 0.2 than at 0 (figures in docs/speed.md). The code below draws the same masks (each element dropped
independently with probability p, survivors scaled by 1/(1-p)) from cheap random bits, and
computes attention dropout in chunks of a few sequences.
The bits come from numpy's SFC64 generator seeded from torch's global RNG, so
torch.manual_seed and torch.set_rng_state still determine every mask (exact resume holds).
Only used on CPU in eager mode: GPUs and torch.compile keep torch's own dropout.

Where the system has a C compiler (Linux, macOS), cpu_kernels.c is built once into the user's
cache and does the element-wise work in one pass each, on every core: the generator (numpy's
SFC64, word for word), masks applied straight from the random bits, the residual add with its
dropout, the bf16 attention backward's ds, and the model's options outside dropout: the relu2
activation, the parameter-free RMSNorm (its row sums in torch's own order where that order is
checked to match) and (float32) the rotary embedding, each way. Without one,
numpy and torch do the same work in more passes; both ways give the same values bit for bit
(tested), so a run does not depend on which one a machine takes. bench.py prints which it took.
model.py uses seven names from here: Dropout, residual_dropout, causal_attention, relu_squared,
gelu, rms_norm and rotary; bench.py turns them all off with torch_kernels() to time nanoGPT's step (torch's
dropout and SDPA) side by side with ours.
"""
import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from hardware import failure_noted, mark_used, note_failure, prune_cache, user_cache


_enabled = True  # False inside torch_kernels()


@contextlib.contextmanager
def torch_kernels():
    """Inside this block Dropout and causal_attention run torch's own kernels on CPU too, as
    nanoGPT does: the baseline of bench.py's side-by-side training row."""
    global _enabled
    was, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = was


# ---------------------------------------------------------------------------- the C kernels

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_PTR, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
_SIGNATURES = {  # cpu_kernels.c's functions and their arguments
    "sfc64_fill": (_PTR, _PTR, _I64),
    "mask_mul_bf16": (_PTR, _PTR, _PTR, _I64, _I64, _I32, _F32),
    "mask_mul_f32": (_PTR, _PTR, _PTR, _I64, _I64, _I32, _F32),
    "causal_mask_bf16": (_PTR, _PTR, _PTR, _I64, _I64, _I64, _I32),
    "causal_mask_f32": (_PTR, _PTR, _PTR, _I64, _I64, _I64, _I32),
    "add_mask_mul_bf16": (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I32, _F32),
    "add_mask_mul_f32": (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I32, _F32),
    "mask_mul_f32_to_bf16": (_PTR, _PTR, _PTR, _I64, _I64, _I32, _F32),
    "attention_ds_bf16": (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64),
    "causal_softmax_bf16": (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I32, _I64),
    "exp_f32": (_PTR, _PTR, _I64, _I64),
    **{f"split_heads_{t}": (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _F32) for t in ("bf16", "f32")},
    **{f"relu_squared_forward_{t}": (_PTR, _PTR, _I64, _I64) for t in ("bf16", "f32")},
    **{f"relu_squared_backward_{t}": (_PTR, _PTR, _PTR, _I64, _I64) for t in ("bf16", "f32")},
    "lookup_grad_bf16": (_PTR, _PTR, _PTR, _PTR, _I64, _I64),
    **{f"rotary_{t}": (_PTR, _PTR, _PTR, _PTR, _I64, _I64, *[_I64] * 7, _I32) for t in ("bf16", "f32")},
    **{f"rms_square_{t}": (_PTR, _PTR, _I64, _I64, *[_I64] * 9) for t in ("bf16", "f32")},
    **{f"rms_scale_{t}": (_PTR, _PTR, _PTR, _I64, _I64, *[_I64] * 9) for t in ("bf16", "f32")},
    **{f"rms_product_{t}": (_PTR, _PTR, _PTR, _I64, _I64, *[_I64] * 6) for t in ("bf16", "f32")},
    "rms_grad_bf16": (_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, *[_I64] * 6),
    **{f"rms_sums_{t}": (_PTR, _PTR, _PTR, _I64, _I64, *[_I64] * 7, _I32) for t in ("bf16", "f32")},
    "row_sums_f32": (_PTR, _PTR, _I64, _I64, _I64, _I64),
    "rms_grad_terms_f32": (_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, *[_I64] * 6),
    **{f"qk_forward_{t}": (*[_PTR] * 5, _I64, _I64, *[_I64] * 6, _F32) for t in ("bf16", "f32")},
    **{f"qk_backward_{t}": (*[_PTR] * 8, _I64, _I64, *[_I64] * 6) for t in ("bf16", "f32")},
    "kernels_openmp": (),
}
# -ffp-contract=off: each multiply and add rounds on its own, as torch's separate ops do;
# -fno-trapping-math: nothing here reads floating-point exception flags, so gcc may compute a
# value on both sides of a test and blend them (clang's default; gcc otherwise keeps the branch
# and leaves the loop scalar: relu2's, with AVX2 only); the values are the same;
# on x86 the AVX512 build may use whole 512-bit vectors (gcc's default stops at 256 bits in
# places: the softmax kernel's exp ran at half speed)
_X86 = platform.machine().lower() in ("x86_64", "amd64")
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fPIC", "-shared",
          *(["-mprefer-vector-width=512"] if _X86 else [])]
# the instruction sets of torch's own CPU kernels for each capability (its cmake), so that the
# library runs wherever torch runs those: one build for the CPU in front of us, a third of the
# compiling of one build with a version for each (target_clones, before)
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
              "AVX2": ["-mavx2", "-mfma"]}
_c_state: dict = {}  # "lib": the loaded library or None, "why": what was used and why
_c_allowed = True  # False inside without_c()


def _compiler() -> str | None:
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next(filter(None, map(shutil.which, names)), None)


def _build(compiler: str, path: Path) -> str | None:
    """Compile cpu_kernels.c into the shared library at path (written to a temporary name and
    renamed, so that processes building at once never load half a file). None, or why not."""
    import subprocess  # here: a process that only samples never builds

    path.parent.mkdir(parents=True, exist_ok=True)
    why = ""
    # OpenMP where the compiler has it (gcc; not Apple's clang, nor a clang without libomp: a few
    # lines find out first, where a failed link of the whole file came after all its
    # compiling), this CPU's vector instructions where the compiler takes them
    openmp, isa = _links(compiler, [*_FLAGS, "-fopenmp"], path.parent), _isa_flags()
    attempts = [[*_FLAGS, *threads, *vectors]
                for threads in ([["-fopenmp"]] if openmp else []) + [[]]
                for vectors in ([isa] if isa else []) + [[]]]
    for i, flags in enumerate(attempts):
        # a name of its own for each attempt: the check below loads it, and a process that has
        # loaded a library by a name gets that one again for the same name
        partial = path.with_name(f"{path.stem}.{os.getpid()}.{i}.partial{path.suffix}")
        try:
            done = subprocess.run([compiler, *flags, "-o", str(partial), str(_SOURCE), "-lm"],
                                  capture_output=True, text=True, encoding="utf-8",
                                  errors="replace", timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            partial.unlink(missing_ok=True)
            return f"{compiler} failed ({type(e).__name__})"
        if done.returncode == 0 and not (missing := _missing_names(partial)):
            os.replace(partial, path)
            return None
        why = (f"its library lacks the name {missing[0]}" if done.returncode == 0
               else (done.stderr.strip().splitlines() or ["no message"])[0][:200])
        partial.unlink(missing_ok=True)
    return f"{compiler} could not build {_SOURCE.name}: {why}"


def _isa_flags() -> list[str]:
    """The compiler flags for this CPU's vector instructions: torch's own for its capability here
    (AVX512 or AVX2 on x86-64; ATEN_CPU_CAPABILITY lowers it), none elsewhere."""
    return _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), []) if _X86 else []


def _links(compiler: str, flags: list[str], folder: Path) -> bool:
    """Whether compiler builds a shared library of a few lines of C with flags (a parallel
    loop, for -fopenmp): a quick probe before a build of the whole file."""
    import subprocess

    stem = folder / f"probe-{os.getpid()}"
    source, library = stem.with_suffix(".c"), stem.with_suffix(".so")
    source.write_text("int kernels_probe(int n) {\n    int total = 0;\n"
                      "#pragma omp parallel for reduction(+: total)\n"
                      "    for (int i = 0; i < n; i++) total += i;\n    return total;\n}\n", encoding="utf-8")
    try:
        return subprocess.run([compiler, *flags, "-o", str(library), str(source)], capture_output=True,
                              timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        source.unlink(missing_ok=True)
        library.unlink(missing_ok=True)


def _missing_names(library) -> list[str]:
    """The kernels that a library (loaded, or the path of one) does not export by name (all, if
    it will not load: a stale or foreign file)."""
    try:
        lib = library if isinstance(library, ctypes.CDLL) else ctypes.CDLL(str(library))
    except OSError:
        return list(_SIGNATURES)
    return [name for name in _SIGNATURES if not hasattr(lib, name)]


def _load():
    """The C kernels, built into the user's cache on first use (once: docs/speed.md), or None and
    _c_state["why"] says why (no compiler, Windows, a failed build)."""
    if sys.platform == "win32":
        return None, "numpy kernels (the C ones are built on Linux and macOS)"
    compiler = _compiler()
    if compiler is None:
        return None, "numpy kernels (no C compiler: cc, gcc or clang; CC names another)"
    isa = _isa_flags()  # one library per kind of CPU: a cache shared by different CPUs stays safe
    key = hashlib.sha256(_SOURCE.read_bytes() + f"{os.path.realpath(compiler)} {_FLAGS} {isa} {sys.platform} "
                         f"{platform.machine()}".encode()).hexdigest()[:20]
    kind = torch.backends.cpu.get_cpu_capability().lower() if isa else "default"
    path = user_cache("kernels") / f"cpu_kernels-{kind}-{key}{'.dylib' if sys.platform == 'darwin' else '.so'}"
    failed = path.with_suffix(".failed")  # a build that failed with this compiler, this source, this CPU kind
    try:
        if path.exists():
            mark_used(path)
        elif why := remembered_failure(failed, compiler):  # not the same half minute of failing in every run
            return None, f"numpy kernels ({why}; that build failed here today: delete {failed} to try again)"
        elif why := no_apple_compiler(compiler):
            return None, f"numpy kernels ({why})"
        elif why := _build(compiler, path):
            if why.startswith(f"{compiler} could not build"):  # the compiler's answer, not a timeout
                remember_failure(failed, why, compiler)
            return None, f"numpy kernels ({why})"
        else:
            prune_cache(path, f"cpu_kernels-*{path.suffix}")  # builds unused for a month
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # an unwritable cache, a library this system cannot load
        return None, f"numpy kernels ({type(e).__name__}: {e})"
    if missing := _missing_names(lib):
        return None, f"numpy kernels ({path} lacks {missing[0]}: delete it to build it again)"
    for name, args in _SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
    lib.kernels_openmp.restype = ctypes.c_int
    lib.openmp = bool(lib.kernels_openmp())
    return lib, f"C kernels ({path}{', OpenMP' if lib.openmp else ''})"


FAILURE_KEPT_HOURS = 24  # a failed build is tried again after this long, or at once when the compiler changes


def compiler_stamp(compiler: str) -> list:
    """What changes when the compiler is installed again or updated: its file's size and time."""
    try:
        st = os.stat(compiler)
        return [st.st_size, int(st.st_mtime)]
    except OSError:
        return []


def remembered_failure(marker: Path, compiler: str) -> str | None:
    """Why the build that marker remembers failed, if it failed in the last day with this very
    compiler; else None."""
    return failure_noted(marker, FAILURE_KEPT_HOURS * 3600, {"compiler": compiler_stamp(compiler)})


def remember_failure(marker: Path, why: str, compiler: str):
    note_failure(marker, why, {"compiler": compiler_stamp(compiler)})


def no_apple_compiler(compiler: str) -> str | None:
    """On macOS, /usr/bin/cc is there even without Xcode's command line tools: a stub that
    fails, and asks the user to install them in a dialog. Why not to run it, or None."""
    import subprocess

    if sys.platform != "darwin" or not compiler.startswith("/usr/bin/"):
        return None
    try:
        installed = subprocess.run(["xcode-select", "-p"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        installed = False
    return None if installed else "no C compiler: Xcode's command line tools are not installed (xcode-select --install)"


def _c():
    """The loaded C kernels, or None (numpy and torch do their work)."""
    if not _c_allowed:
        return None
    if "lib" not in _c_state:
        _c_state["lib"], _c_state["why"] = _load()
    return _c_state["lib"]


def kernels_used() -> str:
    """Which dropout kernels this process uses and why, in a few words (bench.py prints it)."""
    _c()
    return _c_state.get("why", "numpy kernels (turned off)")


@contextlib.contextmanager
def without_c():
    """Inside this block the numpy path runs even where the C kernels are built (for tests and
    bench.py's side-by-side rows)."""
    global _c_allowed
    was, _c_allowed = _c_allowed, False
    try:
        yield
    finally:
        _c_allowed = was


_pool: dict = {}  # workers -> a concurrent.futures.ThreadPoolExecutor of that many threads
if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: new pools
    os.register_at_fork(after_in_child=_pool.clear)


def _on_all_cores(fn, n: int, size: int, arrays: tuple, *rest):
    """fn(*arrays' addresses, start, stop, *rest) over items [0, n), each of `size` elements,
    on every core: built with OpenMP, one call, which torch's own OpenMP threads share out (they
    are still spinning after torch's last op: Python threads started then waited for them, a
    dropout 4.4 against 2.4 ms after a sleep). Else split among Python threads: ctypes lets go
    of the GIL, so the parts run at once, the calling thread doing the first."""
    if _c_state["lib"].openmp:
        fn(*[_ptr(a) for a in arrays], 0, n, *rest)
        return
    parts = min(torch.get_num_threads(), n, max(1, n * size // 32768))  # 32K elements a part at least
    bounds = [n * i // parts for i in range(parts + 1)]
    if parts > 1 and parts - 1 not in _pool:
        from concurrent.futures import ThreadPoolExecutor

        _pool[parts - 1] = ThreadPoolExecutor(parts - 1, thread_name_prefix="cpu_kernels")
    head = [_ptr(a) for a in arrays]
    others = [_pool[parts - 1].submit(fn, *head, bounds[i], bounds[i + 1], *rest) for i in range(1, parts)]
    fn(*head, bounds[0], bounds[1], *rest)
    for f in others:
        f.result()


def _rounded(value: float, dtype: torch.dtype) -> float:
    """value as a tensor of dtype holds it (the survivors' scale a C kernel multiplies by, so
    that it equals torch's multiply by a mask of that dtype)."""
    return torch.tensor(value, dtype=dtype).item()


def _ptr(a) -> int | None:
    if a is None:  # NULL: a kernel's optional array
        return None
    return a.data_ptr() if isinstance(a, torch.Tensor) else a.ctypes.data


def use_cpu_dropout(x: torch.Tensor) -> bool:
    return _enabled and x.device.type == "cpu" and not torch.compiler.is_compiling()


class _Bits:
    """A stream of uniform int16 values from numpy's SFC64 generator (much cheaper than torch's
    bernoulli_ on CPU) seeded with one draw from torch's global RNG: numpy draws them, or the C
    kernels' copy of the generator from numpy's starting state (the same values, faster)."""

    def __init__(self):
        self.numpy = np.random.SFC64(int(torch.randint(0, 2**62, (1,)).item()))
        self.lib = _c()
        if self.lib is not None:
            self.state = self.numpy.state["state"]["state"].astype(np.uint64)  # a, b, c, counter

    def words(self, n: int) -> np.ndarray:
        """The next n uint64 words of the stream, as 4 * n int16 values."""
        if self.lib is None:
            return self.numpy.random_raw(n).view(np.int16)
        out = np.empty(n, dtype=np.uint64)
        self.lib.sfc64_fill(self.state.ctypes.data, out.ctypes.data, n)
        return out.view(np.int16)


def _random_int16(n: int) -> np.ndarray:
    """n uniform int16 values from a new _Bits stream."""
    return _Bits().words((n + 3) // 4)[:n]  # four int16 per word


def _drop_threshold(p: float) -> tuple[int, float]:
    """16 random bits per element: an int16 below the threshold is dropped, so P(drop) =
    round(p * 2**16) / 2**16, within 8e-6 of p; the survivors' scale 1 / (1 - that) keeps the
    expectation exact."""
    drop_count = round(p * 65536)
    return drop_count - 32768, 65536 / (65536 - drop_count)


_C_TYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}  # the dtypes cpu_kernels.c handles
_BITS = {2: (np.uint16, torch.int16), 4: (np.uint32, torch.int32), 8: (np.uint64, torch.int64)}  # by item size


def _ones_where_kept(drop: np.ndarray, dtype: torch.dtype, value: float = 1.0) -> torch.Tensor:
    """A tensor of dtype: value (1, or the survivors' scale) where `drop` (a numpy bool array)
    is False, 0 where True. Made as the bit pattern of value times the kept bytes, in numpy:
    multiplying by this mask is much faster on CPU than torch.where with a bool mask
    (docs/speed.md), and gives the same values."""
    uint, same_size_int = _BITS[torch.empty((), dtype=dtype).element_size()]
    bits = torch.tensor(value, dtype=dtype).view(same_size_int).item()  # the bits of value (positive)
    ones = np.multiply(np.logical_not(drop), uint(bits), dtype=uint)
    return torch.from_numpy(ones).view(dtype)


def _dropped_numpy(shape, p: float) -> tuple[np.ndarray, float]:
    """A numpy bool array of `shape`, True where an element is dropped, and the survivors' scale."""
    threshold, scale = _drop_threshold(p)
    return np.less(_random_int16(math.prod(shape)).reshape(shape), threshold), scale


class _CausalDropStream:
    """The attention dropout mask (B, nh, T, T) of one call, drawn a few batch rows at a time so
    each chunk of attention meets its mask while both are in cache. Row b's draws follow row
    b-1's in one SFC64 stream seeded by one draw from torch's RNG, so the mask does not depend
    on how the rows are chunked: drop(B) at once equals drop(1) B times.
    With T even only the causal part (key <= query) is drawn: half the random bits. Query rows
    i and T-1-i need i+1 and T-i draws, T+1 together, so one row of (T/2, T+1) draws serves
    both: row i reads it forwards, row T-1-i backwards from its end. Entries above the diagonal
    repeat draws from below it and must not be used. Odd T draws the whole square."""

    def __init__(self, nh: int, T: int, p: float):
        self.nh, self.T = nh, T
        self.threshold, self.scale = _drop_threshold(p)
        self.per_row = nh * T * T if T % 2 else nh * (T // 2) * (T + 1)  # int16 draws per batch row
        self.stream = _Bits()

    def bits(self, rows: int) -> np.ndarray:
        """The next rows' int16 draws, (rows, per_row)."""
        words = (self.per_row + 3) // 4  # uint64 words per batch row, four int16 each
        return self.stream.words(rows * words).reshape(rows, 4 * words)[:, :self.per_row]

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (rows * nh, T, T), contiguous: the next rows' probabilities times their mask
        (0 where dropped, else unchanged). In one pass with the C kernels, else in numpy and torch."""
        kernel = getattr(self.stream.lib, f"causal_mask_{_C_TYPES.get(probs.dtype)}", None)
        rows = probs.size(0) // self.nh
        if kernel is None:
            return probs * _ones_where_kept(self.drop(rows), probs.dtype).view(probs.shape)
        bits = np.ascontiguousarray(self.bits(rows))  # a copy only when per_row % 4 leaves a gap
        out = torch.empty_like(probs)
        _on_all_cores(kernel, probs.size(0), self.T * self.T, (probs, bits, out), self.T, self.threshold)
        return out

    def softmax(self, scores: torch.Tensor, lanes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """scores (rows * nh, T, T) bf16, contiguous, the causal part read (no mask added): their
        causal softmax P and P times the next rows' mask, in one C pass (_causal_softmax)."""
        rows = scores.size(0) // self.nh
        return _causal_softmax(scores, lanes, np.ascontiguousarray(self.bits(rows)), self.threshold)

    def drop(self, rows: int) -> np.ndarray:
        """A numpy bool (rows, nh, T, T), True where a probability is dropped: the next rows."""
        nh, T = self.nh, self.T
        bits = self.bits(rows)
        if T % 2:
            return np.less(bits.reshape(rows, nh, T, T), self.threshold)
        half = T // 2
        bits = bits.reshape(rows * nh, half, T + 1)
        drop = np.empty((rows, nh, T, T), dtype=np.bool_)
        out = drop.reshape(rows * nh, T, T)
        np.less(bits[:, :, :T], self.threshold, out=out[:, :half])  # row i, columns 0..i used
        np.less(bits[:, ::-1, :0:-1], self.threshold, out=out[:, half:])  # row T-1-i: draws T..i+1
        return drop


def _causal_softmax(scores: torch.Tensor, lanes: int, bits: np.ndarray | None = None, threshold: int = 0):
    """torch.softmax(scores + causal, -1) of bf16 scores (n, T, T), contiguous, by the C kernel
    (only the causal part computed, the rest 0), and with bits (causal_mask's layout) also the
    softmax times its dropout mask: (P, Pm), Pm None without bits. lanes: _softmax_lanes()."""
    p = torch.empty_like(scores)
    pm = torch.empty_like(scores) if bits is not None else None
    T = scores.size(-1)
    _on_all_cores(_c().causal_softmax_bf16, scores.size(0), T * T, (scores, bits, p, pm), T, threshold, lanes)
    return p, pm


def _softmax_lanes() -> int:
    """The float vector width (16 or 8) with which cpu_kernels.c's causal_softmax_bf16 gives
    torch.softmax's values of causally masked bf16 scores bit for bit on this machine (checked
    once, on matrices of several sizes from a private generator), or 0: torch then computes the
    softmax (and the dropout mask in a pass of its own)."""
    if _c() is None:  # no compiler, or inside without_c()
        return 0
    if "softmax_lanes" not in _c_state:
        lanes, gen = 0, torch.Generator().manual_seed(0)
        # on x86, torch's own vector width only (its float vectors: 16 lanes with AVX512, 8 with
        # AVX2; on an AVX2 CPU 16 lanes matched these probes but missed one value in 60,000
        # elsewhere); other CPUs try both
        capability = torch.backends.cpu.get_cpu_capability()
        widths = {"AVX512": (16,), "AVX2": (8,)}.get(capability, (16, 8)) if _X86 else (16, 8)
        for candidate in widths:
            same = True
            for T in (5, 48, 100, 256):
                scores = (torch.randn(2, T, T, generator=gen) * torch.rand(2, T, 1, generator=gen) * 30).bfloat16()
                causal = torch.full((T, T), float("-inf"), dtype=torch.bfloat16).triu_(1)
                same = same and torch.equal(_causal_softmax(scores, candidate)[0], torch.softmax(scores + causal, -1))
            if same:
                lanes = candidate
                break
        _c_state["softmax_lanes"] = lanes
    return _c_state["softmax_lanes"]


def _dropped_causal(B: int, nh: int, T: int, p: float) -> tuple[torch.Tensor, float]:
    """The whole mask _CPUAttention draws after the same torch RNG state, as a torch bool
    (B, nh, T, T), and the survivors' scale (for tests against the naive math)."""
    stream = _CausalDropStream(nh, T, p)
    return torch.from_numpy(stream.drop(B)), stream.scale


class _CPUDropout(torch.autograd.Function):
    """Dropout with a mask from _dropped_numpy, kept for the backward pass as 0 / scale in x's
    dtype: one multiply each way. (In bf16 the scale is rounded to bf16: 1/(1-p) within 0.4%,
    so the kept values' expectation moves by as much; float32 keeps it to 1e-7.)
    With the C kernels the random bits themselves are kept, and each way is one pass over them."""

    @staticmethod
    def forward(ctx, x, p):
        kernel = getattr(_c(), f"mask_mul_{_C_TYPES.get(x.dtype)}", None)
        if kernel is None:
            drop, scale = _dropped_numpy(x.shape, p)
            kept = _ones_where_kept(drop, x.dtype, scale)
            ctx.save_for_backward(kept)
            ctx.kernel = None
            return x * kept
        threshold, scale = _drop_threshold(p)
        bits = torch.from_numpy(_random_int16(x.numel()))
        ctx.save_for_backward(bits)
        ctx.kernel, ctx.threshold = kernel, threshold
        ctx.scale = _rounded(scale, x.dtype)
        return _CPUDropout.masked(ctx, x, bits)

    @staticmethod
    def masked(ctx, x, bits):
        """x * (0 where dropped, else the scale), by the C kernel."""
        x = x.contiguous()
        out = torch.empty_like(x)
        _on_all_cores(ctx.kernel, x.numel(), 1, (x, bits, out), ctx.threshold, ctx.scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors  # the kept values, or the C kernels' random bits
        if ctx.kernel is None:
            return grad * saved, None
        return _CPUDropout.masked(ctx, grad, saved), None


class Dropout(nn.Dropout):
    """nn.Dropout, with the fast mask of _CPUDropout on CPU."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x  # nothing to drop (skips a dispatch per call when decoding token by token)
        if use_cpu_dropout(x):
            return _CPUDropout.apply(x, self.p)
        return super().forward(x)


class _CPUResidualDropout(torch.autograd.Function):
    """x + dropout(y) by the C kernels in one pass: the residual stream x (float32) plus a
    block's output y (float32, or bf16 under autocast), with the mask _CPUDropout would draw
    and the same values bit for bit. Backward: x's gradient passes through as it is, y's is
    cast to y's dtype and masked in one pass."""

    @staticmethod
    def forward(ctx, x, y, p):
        lib = _c()
        threshold, scale = _drop_threshold(p)
        bits = torch.from_numpy(_random_int16(y.numel()))
        ctx.save_for_backward(bits)
        ctx.threshold, ctx.scale = threshold, _rounded(scale, y.dtype)
        ctx.backward_kernel = lib.mask_mul_f32_to_bf16 if y.dtype == torch.bfloat16 else lib.mask_mul_f32
        ctx.y_dtype = y.dtype
        x, y = x.contiguous(), y.contiguous()
        out = torch.empty_like(x)
        kernel = getattr(lib, f"add_mask_mul_{_C_TYPES[y.dtype]}")
        _on_all_cores(kernel, x.numel(), 1, (x, y, bits, out), threshold, ctx.scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        grad = grad.contiguous()
        grad_y = torch.empty(grad.shape, dtype=ctx.y_dtype)
        _on_all_cores(ctx.backward_kernel, grad.numel(), 1, (grad, bits, grad_y), ctx.threshold, ctx.scale)
        return grad, grad_y, None


def residual_dropout(x: torch.Tensor, y: torch.Tensor, dropout: nn.Dropout) -> torch.Tensor:
    """x + dropout(y): the residual stream plus a block's output after its dropout module.
    Training on CPU with the C kernels built, in one pass (_CPUResidualDropout); else as written."""
    if (dropout.training and dropout.p > 0 and use_cpu_dropout(y) and x.shape == y.shape
            and x.dtype == torch.float32 and y.dtype in _C_TYPES and _c() is not None):
        return _CPUResidualDropout.apply(x, y, dropout.p)
    return x + dropout(y)


# ---------------------------------------------------------------------------- relu2, rotary, RMSNorm

def _elementwise(x: torch.Tensor, name: str):
    """cpu_kernels.c's `name` kernel for x's dtype where it applies (eager work on a CPU tensor
    of some size, the C kernels built: not under torch.compile, export or tracing), else None."""
    if (not _enabled or x.device.type != "cpu" or x.dtype not in _C_TYPES or x.numel() < 4096
            or torch.compiler.is_compiling() or torch.jit.is_tracing()):
        return None
    return getattr(_c(), f"{name}_{_C_TYPES[x.dtype]}", None)


class _CPUReLUSquared(torch.autograd.Function):
    """relu(x)^2 in one pass each way (torch: relu, square, and three passes back), the same
    values bit for bit; x is kept for the backward pass, where torch keeps relu(x)."""

    @staticmethod
    def forward(ctx, x, forward_kernel, backward_kernel):
        x = x.contiguous()
        out = torch.empty_like(x)
        _on_all_cores(forward_kernel, x.numel(), 1, (x, out))
        ctx.save_for_backward(x)
        ctx.kernel = backward_kernel
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad = grad.contiguous()  # autograd hands it over in x's dtype
        out = torch.empty_like(x)
        _on_all_cores(ctx.kernel, x.numel(), 1, (x, grad, out))
        return out, None, None


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (model.ReLUSquared): by the C kernels where they apply, else torch's ops."""
    forward = _elementwise(x, "relu_squared_forward")
    if forward is None:
        return F.relu(x).square()
    return _CPUReLUSquared.apply(x, forward, _elementwise(x, "relu_squared_backward"))



_GRAIN = 32768  # ATen's GRAIN_SIZE: above it an element-wise op's loop is split among threads


class _GELUTables:
    """torch's GELU backward of one `approximate` on every bf16 x, for cpu_kernels.c's lookup:
    the float32 factor f(x) with gradient = bf16(g * f(x)), the last product and rounding of
    torch's bf16 kernel. The factor comes twice, as torch's vector code computes it and as its
    scalar code does (read from a strided view, which takes the scalar code throughout): their
    erf, exp and tanh differ in the last bit for some inputs, and some of torch's loops compute
    the last (share % step) elements of each thread's share of a contiguous tensor with the
    scalar code. Where, and whether, is found per thread count by comparing with torch on inputs
    where the two differ (a layout: _find); with no layout that matches, torch's op runs."""

    # (step, capped): the last (share % step) of each share are scalar, the shares being
    # at::parallel_for's, one per thread (capped: at most one per _GRAIN elements); step 0: none
    LAYOUTS = [(0, False)] + [(step, capped) for step in (64, 32, 16, 8, 128) for capped in (True, False)]

    def __init__(self, approximate: str):
        self.approximate = approximate
        self.values = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
            xf = self.values.float()
            spaced = torch.empty(2 * 65536)[::2].copy_(xf)  # strided: the scalar code
            gelu_backward = torch.ops.aten.gelu_backward
            self.factor = (gelu_backward(torch.ones(65536), xf, approximate=approximate),
                           gelu_backward(torch.ones(2 * 65536)[::2], spaced, approximate=approximate).contiguous())
        self.layouts: dict = {}  # torch's thread count -> a layout, or None: torch's op runs

    def layout(self) -> tuple | None:
        threads = torch.get_num_threads()
        if threads not in self.layouts:
            self.layouts[threads] = self._find()
        return self.layouts[threads]

    @staticmethod
    def tails(n: int, layout: tuple) -> list[tuple[int, int]]:
        """The [start, stop) ranges of a contiguous op over n elements that torch's scalar code
        computes, in that layout."""
        step, capped = layout
        threads = torch.get_num_threads()
        if not step:
            return []
        parts = 1 if n < _GRAIN or threads == 1 else min(threads, -(-n // _GRAIN)) if capped else threads
        share = -(-n // parts)
        ranges = [(a + (min(n, a + share) - a) // step * step, min(n, a + share)) for a in range(0, n, share)]
        return [(a, b) for a, b in ranges if a < b]

    def grad(self, x: torch.Tensor, g: torch.Tensor, layout: tuple) -> torch.Tensor:
        out = torch.empty_like(x)
        _on_all_cores(_c().lookup_grad_bf16, x.numel(), 1, (x, g, self.factor[0], out))
        flat_x, flat_g, flat_out = x.view(-1), g.view(-1), out.view(-1)
        for a, b in self.tails(x.numel(), layout):
            factor = self.factor[1][flat_x[a:b].view(torch.int16).long() & 0xFFFF]
            flat_out[a:b] = (flat_g[a:b].float() * factor).to(torch.bfloat16)
        return out

    def _find(self) -> tuple | None:
        """The first layout whose lookups give torch's values on probes made of the inputs where
        its vector and scalar code differ: short ones (one share), long ones (one per thread)."""
        g = 0.7  # a gradient where bf16(g * f) differs between the two factors for some x
        with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
            vec, scalar = ((g * f).to(torch.bfloat16).view(torch.int16) for f in self.factor)
            values = self.values[vec != scalar]
            if not values.numel():
                return (0, False)  # the two codes agree: any layout gives torch's values
            probes = []  # (x, grad, torch's gradient)
            for n in (127, 1000, 32_769, 100_003):
                x = values[torch.arange(n) % values.numel()]
                grad = torch.full_like(x, g)
                probes.append((x, grad, torch.ops.aten.gelu_backward(grad, x, approximate=self.approximate)))
            for layout in self.LAYOUTS:
                if all(torch.equal(self.grad(x, grad, layout).view(torch.int16), theirs.view(torch.int16))
                       for x, grad, theirs in probes):
                    return layout
        return None


_gelu_tables: dict = {}  # approximate -> _GELUTables


class _CPUGELU(torch.autograd.Function):
    """GELU of a contiguous bf16 tensor: torch's forward, and its backward by table lookups
    (_GELUTables) in one pass at memory speed (torch's computes erf and exp per element), the
    same values bit for bit (NaN as a NaN). x is kept for the backward pass, as torch keeps it."""

    @staticmethod
    def forward(ctx, x, tables):
        ctx.save_for_backward(x)
        ctx.tables = tables
        return F.gelu(x, approximate=tables.approximate)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        tables = ctx.tables
        layout = tables.layout()
        if layout is None or not grad.is_contiguous() or grad.dtype != x.dtype:  # torch's op
            return torch.ops.aten.gelu_backward(grad, x, approximate=tables.approximate), None
        return tables.grad(x, grad, layout), None


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """F.gelu(x, approximate) (model.GELU): in bf16 training on a CPU, its backward by the C
    kernels' table lookups; else torch's op."""
    if (not x.requires_grad or not torch.is_grad_enabled() or x.dtype != torch.bfloat16
            or not x.is_contiguous() or _elementwise(x, "lookup_grad") is None):
        return F.gelu(x, approximate=approximate)
    if approximate not in _gelu_tables:
        _gelu_tables[approximate] = _GELUTables(approximate)
    return _CPUGELU.apply(x, _gelu_tables[approximate])


def _rotate(kernel, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: int) -> torch.Tensor:
    B, nh, T, hs = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)  # contiguous, as torch.cat makes it
    _on_all_cores(kernel, B * nh * T, hs, (x, cos, sin, out), nh, T, hs // 2, *x.stride()[:3],
                  T * hs // 2 if cos.dim() == 4 else 0, backward)
    return out


class _CPURotary(torch.autograd.Function):
    """model.apply_rotary's rotation in one pass each way (torch: four multiplies, an add, a
    subtract and a cat; the same again back), the same values bit for bit, in float32 and in
    bf16 (each product and sum rounded to bf16, as torch's ops round them)."""

    @staticmethod
    def forward(ctx, x, cos, sin, kernel):
        ctx.save_for_backward(cos, sin)
        ctx.kernel = kernel
        return _rotate(kernel, x, cos, sin, 0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(ctx.kernel, grad, cos, sin, 1), None, None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x (B, nh, T, hs) with each channel pair (i, i + hs/2) rotated, cos and sin (T, hs/2) or
    (B, 1, T, hs/2) in x's dtype, by the C kernel (float32 or bf16); None where it does not
    apply (model.py's apply_rotary then runs torch's ops)."""
    kernel = _elementwise(x, "rotary")
    if kernel is None or x.dim() != 4 or cos.dtype != x.dtype or cos.requires_grad or sin.requires_grad:
        return None
    return _CPURotary.apply(x, cos, sin, kernel)


def _row_layout(t: torch.Tensor) -> tuple[int, ...]:
    """(d1, d2, s0, s1, s2): t's rows (all but its last dimension, at most three) as sizes and
    strides over three leading dimensions, for cpu_kernels.c's ROW_OFFSET."""
    sizes, strides = [1, 1, 1, *t.shape[:-1]][-3:], [0, 0, 0, *t.stride()[:-1]][-3:]
    return sizes[1], sizes[2], *strides


def _sum_lanes(n: int) -> int:
    """The vector width (floats) of torch's float32 sum on this machine, if cpu_kernels.c's
    torch_sum adds in the very order of torch.sum there (checked once, on rows of several
    lengths, from a private generator), and n fits its kernels; else 0 (torch then reduces)."""
    if "lanes" not in _c_state:
        lanes, lib, gen = 0, _c(), torch.Generator().manual_seed(0)
        for candidate in (16, 8, 4) if lib is not None else ():
            same = True
            for length in (16, 48, 100, 192, 768, 4099):
                if length < candidate:
                    continue
                rows = torch.randn(8, length, generator=gen) * torch.rand(8, 1, generator=gen) * 100
                ours = torch.empty(8)
                lib.row_sums_f32(rows.data_ptr(), ours.data_ptr(), 0, 8, length, candidate)
                same = same and torch.equal(ours, rows.sum(-1))
            if same:
                lanes = candidate
                break
        _c_state["lanes"] = lanes
    lanes = _c_state["lanes"]
    return lanes if lanes <= n <= 8192 else 0


class _CPURMSNorm(torch.autograd.Function):
    """Parameter-free RMSNorm over the last dimension (model.py's norm and qk_norm) with the
    element-wise passes in C, and the row sums too where _sum_lanes finds torch's order (else
    torch's reductions): the same values bit for bit as F.rms_norm and autograd's gradient of
    its float32 composite (pow, mean, add, rsqrt, mul, and for bf16 the casts around them).
    Forward in two passes, backward in two to four, instead of about ten.
    x comes in twice: a float32 x gets its gradient from autograd's mul and square as two
    terms, each added in turn to what x's gradient already holds (the residual stream's, say);
    a sum rounds differently in another order, so the two are handed back as two gradients,
    which autograd adds in the same order."""

    @staticmethod
    def forward(ctx, x, same_x, eps, t):
        lib, n, rows = _c(), x.size(-1), x.numel() // x.size(-1)
        layout = _row_layout(x)
        if lanes := _sum_lanes(n):  # the sums of squares in torch's order, in one pass over x
            sums = torch.empty(x.shape[:-1] + (1,))
            _on_all_cores(getattr(lib, f"rms_sums_{t}"), rows, n, (x, x, sums), n, *layout, lanes, 0)
            mean = sums.div_(n)  # torch's mean on a CPU: the sum, then a division
        else:
            sq = torch.empty_like(x, dtype=torch.float32)  # x.float().pow(2), in the layout torch gives it
            _on_all_cores(getattr(lib, f"rms_square_{t}"), rows, n, (x, sq), n, *layout, *_row_layout(sq)[2:])
            mean = sq.mean(-1, keepdim=True)
        r = mean.add_(eps).rsqrt().contiguous()  # one per row
        out = torch.empty(x.shape, dtype=x.dtype)  # contiguous, as torch's x * r comes out
        _on_all_cores(getattr(lib, f"rms_scale_{t}"), rows, n, (x, r, out), n, *layout, *_row_layout(out)[2:])
        ctx.save_for_backward(x, r)
        ctx.t = t
        return out

    @staticmethod
    def backward(ctx, grad):
        x, r = ctx.saved_tensors
        lib, t, n, rows = _c(), ctx.t, x.size(-1), x.numel() // x.size(-1)
        layout = _row_layout(x)
        grad = grad.contiguous()
        if lanes := _sum_lanes(n):  # the row sums of g * x in torch's order, in one pass
            sums = torch.empty(r.shape)
            _on_all_cores(getattr(lib, f"rms_sums_{t}"), rows, n, (x, grad, sums), n, *layout, lanes, 1)
        else:
            prod = torch.empty(x.shape, dtype=torch.float32)  # g * x, which the mul's backward sums
            _on_all_cores(getattr(lib, f"rms_product_{t}"), rows, n, (grad, x, prod), n, *layout)
            sums = prod.sum(-1, keepdim=True)
        gv = -0.5 * sums * r.pow(3)  # RsqrtBackward's term, as autograd writes it
        if t == "bf16":  # both terms meet in float32 before the cast back: one gradient
            out = torch.empty(x.shape, dtype=x.dtype)
            _on_all_cores(lib.rms_grad_bf16, rows, n, (grad, x, r, gv, out), n, *layout)
            return out, None, None, None
        direct, squared = torch.empty(x.shape), torch.empty(x.shape)
        _on_all_cores(lib.rms_grad_terms_f32, rows, n, (grad, x, r, gv, direct, squared), n, *layout)
        return direct, squared, None, None


def rms_norm(x: torch.Tensor, normalized_shape, eps: float | None = None) -> torch.Tensor:
    """F.rms_norm(x, normalized_shape, eps=eps) without a weight; training on a CPU with the C
    kernels built, by _CPURMSNorm (the same values, fewer passes)."""
    if (len(normalized_shape) != 1 or x.dim() > 4 or not (torch.is_grad_enabled() and x.requires_grad)
            or _elementwise(x, "rms_scale") is None or x.stride(-1) != 1):
        return F.rms_norm(x, normalized_shape, eps=eps)
    return _CPURMSNorm.apply(x, x, torch.finfo(torch.float32).eps if eps is None else eps, _C_TYPES[x.dtype])


class _CPUQKHeads(torch.autograd.Function):
    """model.py's q, k and v for the qk_norm and rotary options, from c_attn's output qkv
    (B, T, 3C): the split into heads, each head's q and k through rms_norm and then the rotary
    embedding, as three contiguous (B, nh, T, hs) tensors. The same values bit for bit as the
    views, _CPURMSNorm and _CPURotary give (and the gradient they and the split's cat give qkv),
    in one C pass each way instead of about a dozen: a head row is 48 values at the 5-minute
    model's size, so those passes cost far more per value than their arithmetic."""

    @staticmethod
    def forward(ctx, qkv, nh, cos, sin, eps, lanes):
        B, T, C3 = qkv.shape
        hs = C3 // 3 // nh
        out = torch.empty((3, B, nh, T, hs), dtype=qkv.dtype)
        r = torch.empty(B, T, 2, nh)  # each head row's 1 / RMS, for the backward
        ctx.rest = (B * T, T, nh, hs, T * (hs // 2) if cos.dim() == 3 else 0, lanes)
        _on_all_cores(getattr(_c(), f"qk_forward_{_C_TYPES[qkv.dtype]}"), B * T, C3, (qkv, cos, sin, out, r),
                      *ctx.rest, eps)
        ctx.save_for_backward(qkv, r, cos, sin)
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, gq, gk, gv):
        qkv, r, cos, sin = ctx.saved_tensors
        rows, T, nh, hs = ctx.rest[:4]
        gq, gk, gv = (torch.zeros(rows // T, nh, T, hs, dtype=qkv.dtype) if g is None else g.contiguous()
                      for g in (gq, gk, gv))
        out = torch.empty_like(qkv)
        _on_all_cores(getattr(_c(), f"qk_backward_{_C_TYPES[qkv.dtype]}"), rows, qkv.size(-1),
                      (qkv, gq, gk, gv, r, cos, sin, out), *ctx.rest)
        return out, None, None, None, None, None


def _qk_exact(dtype: torch.dtype, hs: int, lanes: int) -> bool:
    """Whether _CPUQKHeads gives what model.py's own path gives on this machine (its forward and
    backward on a small random input with heads of hs values, zeros, tiny and huge values among
    them): the one pass computes the norm's mean, rsqrt and pow(r, 3) itself, as torch's ops do
    on the CPUs it was checked on. Checked once per dtype and head size."""
    key = ("qk", dtype, hs, lanes)
    if key not in _c_state:
        import model  # the path to match (imported here: model.py imports this module)

        gen = torch.Generator().manual_seed(0)
        B, T, nh = 2, 5, 3
        qkv = (torch.randn(B, T, 3 * nh * hs, generator=gen) * torch.rand(B, T, 1, generator=gen) * 10).to(dtype)
        qkv.view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-30, 3e30])
        qkv.view(B, T, 3, nh, hs)[0, 0, 0, 0] = 0.0  # a row of zeros
        angles = torch.randn(T, hs // 2, generator=gen)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        grads = [torch.randn(B, nh, T, hs, generator=gen).to(dtype) for _ in range(3)]
        results = []
        for fused in (True, False):
            x = qkv.clone().requires_grad_()
            if fused:
                q, k, v = _CPUQKHeads.apply(x, nh, cos, sin, torch.finfo(torch.float32).eps, lanes)
            else:
                q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in x.split(nh * hs, dim=2))
                q, k = (model.apply_rotary(rms_norm(t, (hs,)), cos, sin) for t in (q, k))
            torch.autograd.backward([q, k, v], grads)
            results.append([q, k, v, x.grad])
        _c_state[key] = all(torch.equal(a, b) for a, b in zip(*results))
    return _c_state[key]


def qk_heads(qkv: torch.Tensor, nh: int, cos: torch.Tensor, sin: torch.Tensor) -> tuple | None:
    """q, k, v (B, nh, T, hs) from c_attn's output (B, T, 3C) with q and k RMS-normed (the
    qk_norm option, F.rms_norm's default eps) and rotated by cos, sin ((T, hs/2), or
    (B, T, hs/2) per sequence), by _CPUQKHeads: training on a CPU with the C kernels built,
    where _qk_exact finds them exact; None elsewhere (model.py then takes its views and calls
    rms_norm and apply_rotary)."""
    if (not (torch.is_grad_enabled() and qkv.requires_grad) or qkv.dim() != 3 or not qkv.is_contiguous()
            or cos.requires_grad or sin.requires_grad or _elementwise(qkv, "qk_forward") is None):
        return None
    hs = qkv.size(-1) // 3 // nh
    lanes = _sum_lanes(hs)
    if (hs % 2 or 3 * nh * hs != qkv.size(-1) or nh * hs > 4096 or not lanes or hs >= 64 * lanes
            or not _qk_exact(qkv.dtype, hs, lanes)):
        return None
    cos, sin = cos.to(qkv.dtype).contiguous(), sin.to(qkv.dtype).contiguous()
    return _CPUQKHeads.apply(qkv, nh, cos, sin, torch.finfo(torch.float32).eps, lanes)


def _row_chunks(n: int, per_row: int, budget: int = 1 << 22):
    """Slices of range(n), each of about `budget` elements when a row holds per_row. Every op
    on a chunk is one parallel region, and on a busy host each region waits until all of its
    threads get a core: a few chunks of several rows (8 MB bf16 temporaries at 1 << 22) beat
    many cache-sized ones there, for a few percent more CPU time on one thread (docs/speed.md)."""
    step = max(1, budget // per_row)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _contiguous_times(x: torch.Tensor, scale: float) -> torch.Tensor:
    """A new contiguous tensor of x * scale: a copy, then a multiply in place (a multiply
    straight from a strided view took about twice as long as both; docs/speed.md)."""
    out = x.contiguous()
    if scale == 1.0:
        return out
    return out * scale if out is x else out.mul_(scale)


class _CPUAttention(torch.autograd.Function):
    """Causal attention for training on CPU, with dropout on the attention probabilities.

    The same math as SDPA's unfused path, y = (softmax(q k^T * scale + causal) * M/(1-p)) @ v,
    computed a few sequences at a time so that the (rows, nh, T, T) temporaries stay small,
    with the cheap mask of _dropped_causal. On CPU this beat SDPA's math path (which dropout
    forces) and the flash kernel's backward, which is slow in bf16 and took a large share of a
    small model's step (used without dropout too, for bf16). With P the probabilities, Pm = P * M,
    c = 1/(1-p) (folded into v as vc = c v) and D_i = g_i . y_i:
        y = Pm vc,  dv = c Pm^T g,  ds = Pm * (g vc^T) - P * D,  dq = scale ds k,  dk = scale ds^T q
    P and Pm are kept for the backward pass: 2 * nh * T * T values per sequence (one without
    dropout, where Pm = P).
    mask: None (causal), or a bool (B, 1, T, T) of the keys each query may see (model.py's
    document_mask): its -inf entries make P zero there, so the backward needs nothing more.
    """

    @staticmethod
    def forward(ctx, q, k, v, p, mask=None, qkv=None):
        B, nh, T, hs = q.shape
        ctx.whole = qkv.shape if qkv is not None else None  # the backward hands qkv its gradient whole (_split_from)
        stream = _CausalDropStream(nh, T, p) if p > 0 else None
        keep_scale = stream.scale if p > 0 else 1.0
        # bf16 and causal: the softmax and the mask in one C pass over the causal half (no mask
        # added to the scores); else -inf on keys after the query, added inside the batched matmul
        lanes = _softmax_lanes() if mask is None and q.dtype == torch.bfloat16 and T <= 8192 else 0  # a row on the stack
        if lanes:
            causal = None
        elif mask is None:
            causal = torch.full((T, T), float("-inf"), dtype=q.dtype).triu_(1)
        else:  # (B, 1, T, T): -inf on keys outside the query's document too
            causal = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        # q, k, v arrive as strided views of c_attn's output: made contiguous (with q's
        # 1/sqrt(hs) and v's keep_scale folded in), and from here on every tensor is
        # (B * nh, T, .): each chunk of rows is a contiguous slice for bmm, with no copies
        split = getattr(_c(), f"split_heads_{_C_TYPES.get(q.dtype)}", None) if qkv is not None else None
        if split is None:
            q = _contiguous_times(q, 1.0 / math.sqrt(hs)).flatten(0, 1)
            k = k.contiguous().flatten(0, 1)
            v = _contiguous_times(v, keep_scale).flatten(0, 1)
        else:  # the same three tensors from c_attn's output in one C pass
            q, k, v = torch.empty((3, B * nh, T, hs), dtype=q.dtype).unbind(0)
            _on_all_cores(split, B * nh * T, 3 * hs, (qkv, q, k, v), nh, T, hs, 3 * nh * hs,
                          1.0 / math.sqrt(hs), keep_scale)
        y = torch.empty_like(q)
        probs, kept = [], []  # per chunk: P, Pm, each (rows * nh, T, T)
        with torch.autocast("cpu", enabled=False):  # softmax stays in q's dtype
            for rows in _row_chunks(B, nh * T * T):
                heads = slice(rows.start * nh, rows.stop * nh)
                if lanes:  # no mask added: the kernel reads only keys <= query
                    att = torch.bmm(q[heads], k[heads].transpose(1, 2))
                    P, Pm = stream.softmax(att, lanes) if p > 0 else _causal_softmax(att, lanes)
                    probs.append(P)
                    kept.append(P if Pm is None else Pm)
                else:
                    if mask is None:
                        att = torch.baddbmm(causal, q[heads], k[heads].transpose(1, 2))
                    else:
                        att = torch.bmm(q[heads], k[heads].transpose(1, 2)).view(-1, nh, T, T).add_(causal[rows])
                    probs.append(torch.softmax(att.view(-1, T, T), dim=-1))
                    if p > 0:  # this chunk's mask, drawn per chunk: no full-size mask in memory
                        kept.append(stream.apply(probs[-1]))
                    else:
                        kept.append(probs[-1])
                torch.bmm(kept[-1], v[heads], out=y[heads])
        ctx.save_for_backward(q, k, v, y, *probs, *kept)
        ctx.keep_scale, ctx.nh = keep_scale, nh
        return y.view(B, nh, T, hs)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, y, *chunks = ctx.saved_tensors  # (B * nh, T, hs); q scaled by 1/sqrt(hs), v by keep_scale
        probs, kept = chunks[:len(chunks) // 2], chunks[len(chunks) // 2:]
        B, nh, T, hs = grad.size(0), ctx.nh, q.size(1), q.size(2)
        grad = grad.contiguous().flatten(0, 1)
        acc = torch.promote_types(q.dtype, torch.float32)
        grads = torch.empty((3, *q.shape), dtype=q.dtype)  # dq, dk, dv in one tensor: one copy into qkv's
        dq, dk, dv = grads.unbind(0)
        lib = _c()
        ds_kernel = lib.attention_ds_bf16 if lib is not None and q.dtype == torch.bfloat16 else None
        # D's row sums by the C kernels in torch's order where they have it (the products
        # g * y in float32, as torch's widened multiply makes them, summed in one pass)
        sum_lanes = _sum_lanes(hs) if lib is not None else 0
        sums = getattr(lib, f"rms_sums_{_C_TYPES.get(q.dtype)}", None) if sum_lanes else None
        for rows, p_chunk, pm_chunk in zip(_row_chunks(B, nh * T * T), probs, kept):
            heads = slice(rows.start * nh, rows.stop * nh)
            g = grad[heads]
            # -D, (rows * nh, T, 1): summed in float32, then in q's dtype, so that addcmul_ below
            # runs in one dtype (a float32 operand made it copy the (T, T) tensors three times)
            if sums is None:
                minus_d = (g.to(acc) * y[heads].to(acc)).sum(-1, keepdim=True).neg_().to(q.dtype)
            else:
                d = torch.empty(g.shape[:-1] + (1,))
                _on_all_cores(sums, g.numel() // hs, hs, (y[heads], g, d), hs, *_row_layout(y[heads]), sum_lanes, 1)
                minus_d = d.neg_().to(q.dtype)
            # the constant factors of dv and dq are the products' alpha: no pass of their own
            torch.baddbmm(dv[heads], pm_chunk.transpose(1, 2), g, beta=0, alpha=ctx.keep_scale, out=dv[heads])
            ds = torch.bmm(g, v[heads].transpose(1, 2))
            if ds_kernel is None:
                ds.mul_(pm_chunk).addcmul_(p_chunk, minus_d)
            else:  # the same in one pass
                _on_all_cores(ds_kernel, ds.size(0), T * T, (ds, pm_chunk, p_chunk, minus_d.contiguous()), T)
            torch.baddbmm(dq[heads], ds, k[heads], beta=0, alpha=1.0 / math.sqrt(hs), out=dq[heads])
            torch.bmm(ds.transpose(1, 2), q[heads], out=dk[heads])
        if ctx.whole is not None:  # qkv's gradient in one copy: q, k and v get none of their own
            dqkv = torch.empty(B, T, 3, nh, hs, dtype=q.dtype)
            dqkv.copy_(grads.view(3, B, nh, T, hs).permute(1, 3, 0, 2, 4))
            return None, None, None, None, None, dqkv.view(ctx.whole)
        shape = (B, nh, T, hs)
        return dq.view(shape), dk.view(shape), dv.view(shape), None, None, None


def _split_from(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """The (B, T, 3C) values that q, k, v (B, nh, T, hs) are views of, as model.py makes them
    (c_attn(x).split(C, 2), each viewed as heads and transposed), or None. _CPUAttention then
    hands its gradient to that tensor in one piece, so autograd skips the views' backward
    (a copy of each) and the split's (a cat of all three)."""
    base = q._base
    if base is None or k._base is not base or v._base is not base or not base.requires_grad:
        return None
    B, nh, T, hs = q.shape
    C = nh * hs
    if base.numel() != B * T * 3 * C or base.shape[-1] != 3 * C or not base.is_contiguous() or base.dtype != q.dtype:
        return None  # (B, T, 3C), or (B * T, 3C) where nn.Linear made it as one matrix product
    strides, start = (T * 3 * C, hs, 3 * C, 1), base.storage_offset()
    if any(t.stride() != strides or t.shape != q.shape for t in (k, v)) or q.stride() != strides:
        return None
    return base if [t.storage_offset() - start for t in (q, k, v)] == [0, C, 2 * C] else None


def causal_attention(q, k, v, dropout_p: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal SDPA of q, k, v (B, nh, T, hs) with attention dropout dropout_p (0 in eval).
    Training on CPU with dropout, or in bf16, takes _CPUAttention; everything else SDPA.
    mask: None, or a bool (B, 1, T, T) that replaces the causal mask (documents mode)."""
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if training and use_cpu_dropout(q) and (dropout_p > 0 or q.dtype == torch.bfloat16):
        return _CPUAttention.apply(q, k, v, dropout_p, mask, _split_from(q, k, v))
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
