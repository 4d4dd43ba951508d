"""User errors: one clear line, a non-zero exit, never a traceback.

Every script raises UserError (with the fix in the message) for anything a user can
get wrong, and wraps its main() in run_main(). Other exceptions are our bugs and keep
their traceback.
"""
import codecs
import errno
import importlib.util
import io
import os
import signal
import sys

# what every stage script imports as it starts (requirements.txt; the extras say so themselves)
REQUIRED = ("torch", "numpy", "tiktoken", "tqdm", "filelock", "psutil", "matplotlib")


def starting(name: str):
    """The first line of a stage script, before its heavy imports: when it runs as a script
    (name is __main__), a package of requirements.txt that is not installed is one line, not
    an import traceback, and Ctrl-C while torch imports (a second or more) ends the process
    quietly with 130; run_main hands Ctrl-C back to Python (KeyboardInterrupt) once main runs.
    In a worker process the script started by spawning (macOS's and Windows' way; the script
    is imported again as __mp_main__), Ctrl-C is ignored from here on: the parent handles it,
    and a worker still importing would otherwise print it as a traceback."""
    if name == "__mp_main__":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return
    if name != "__main__":
        return
    missing = [package for package in REQUIRED if importlib.util.find_spec(package) is None]
    if missing:
        print(f"error: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed in this Python "
              f"({sys.executable}); install the requirements: pip install -r requirements.txt", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGINT, _interrupted_while_starting)


def _interrupted_while_starting(signum, frame):
    print("interrupted", file=sys.stderr)
    os._exit(130)  # in the middle of an import: nothing to save or flush but stderr


def use_utf8_streams():
    """Read and print UTF-8 whatever the OS's code page: on Windows, a pipe or a file is
    otherwise read and written in the ANSI code page (cp1252 in Western Europe and the
    Americas), which cannot hold most of what a model writes. (A Windows console already
    gets Unicode; macOS and Linux streams are UTF-8 anyway.)"""
    for name in ("stdin", "stdout", "stderr"):  # a stream closed by the shell (<&-, >&-): the null device
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "r" if name == "stdin" else "w", encoding="utf-8"))
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and codecs.lookup(stream.encoding).name != "utf-8":
            stream.reconfigure(encoding="utf-8")
    for stream in (sys.stdout, sys.stderr):  # a path the OS gave as undecodable bytes prints back as those bytes
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="surrogateescape")


def reader_left(e: OSError) -> bool:
    """Whether a write failed because the reading end of a pipe closed: EPIPE, or on Windows
    EINVAL, which it gives for the same (python/cpython#79935), without a file name (a name
    Windows refuses, `runs/lr:3e-4`, is EINVAL too, with its name)."""
    return isinstance(e, BrokenPipeError) or e.errno == errno.EPIPE or (
        os.name == "nt" and e.errno == errno.EINVAL and e.filename is None)


def _to_null_device(stream) -> bool:
    """Point stream's file descriptor at the null device: what is buffered and written later
    goes nowhere, without an error (the interpreter's flush at exit included)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
        return True
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


class _StdoutThatMayClose:
    """sys.stdout for a long job: when its reader leaves (`python train.py | head`), the job goes
    on; the rest of its lines go to the null device (file descriptor 1 is pointed there, so the
    interpreter's own flush at exit finds nothing to fail on), with one note on stderr (unless
    stderr went with it: `2>&1 | head`)."""

    def __init__(self, stream, what: str):
        self.stream, self.what, self.gone = stream, what, False

    def _closed(self):
        self.gone = True
        if not _to_null_device(self.stream):  # no descriptor: what is left is dropped
            self.stream = open(os.devnull, "w", encoding="utf-8")
        try:
            print(f"note: standard output was closed (its reader left, a `| head`?): {self.what}",
                  file=sys.stderr, flush=True)
        except OSError as e:
            if not reader_left(e):
                raise
            _to_null_device(sys.stderr)

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as e:
            if not reader_left(e):
                raise
            self._closed()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError as e:
            if not reader_left(e):
                raise
            self._closed()
            self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self.stream, name)


class stdout_may_close:
    """`with stdout_may_close("training goes on ..."):` runs a long job with _StdoutThatMayClose;
    on the way out what is buffered is flushed through it, so a reader that left meanwhile is
    met there too, not by the interpreter's flush at exit."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.previous = sys.stdout
        self.wrapper = sys.stdout = _StdoutThatMayClose(sys.stdout, self.what)

    def __exit__(self, *exc):
        try:
            self.wrapper.flush()
        except OSError:
            pass
        finally:
            sys.stdout = self.previous


class UserError(Exception):
    """A mistake the user can fix. The message names the problem and how to fix it."""


# what torch's compile says when no C++ compiler works or the link fails: the machine's problem,
# not the model's (train.py --compile, the sampler's compiled step)
BUILD_FAILED = ("InvalidCxxCompiler", "No working C++ compiler", "CppCompileError", "C++ compile error",
                "ld:", "collect2", "linker", "only support MSVC")  # (the last: MSVC without its English pack)
# what torch's compile builds with, for a message that says what to install
CXX_HINT = ("Visual Studio's C++ build tools with their English language pack, run from its Developer prompt"
            if sys.platform == "win32" else "g++ or clang")


def build_failed(e: BaseException) -> bool:
    return any(marker in str(e) for marker in BUILD_FAILED)


def space_in_python_path() -> str:
    """Why a build may fail here beyond a missing compiler: torch's build does not quote paths,
    and this Python's holds a space. "" when it does not."""
    return (f"this Python's path ({sys.prefix}) holds a space, which torch's build does not quote"
            if " " in sys.prefix else "")


def listed(items, limit: int, sep: str = ", ") -> str:
    """The first `limit` of items joined by sep, and how many more there are: a message names a
    few of many (files, characters) and counts the rest."""
    items = list(items)
    return sep.join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def quoted(path) -> str:
    """A path as a command in a message shows it: in double quotes where it holds a space, so
    that it pastes whole into bash, zsh, PowerShell and cmd alike."""
    text = str(path)
    return f'"{text}"' if any(c.isspace() for c in text) else text


class Terminated(BaseException):
    """SIGTERM before a script's own handler (train.py's stop request) is in place: raised by
    terminate_cleanly's handler, so that what the script holds is released on the way out. A
    BaseException, as KeyboardInterrupt is: no `except Exception` on the way takes it for an error."""


def terminate_cleanly():
    """SIGTERM ends the script as Ctrl-C would, through its finally blocks, not at once. Returns
    what puts the handler that was there back (unless the script has set another since)."""
    def handler(signum, frame):
        raise Terminated
    previous = signal.signal(signal.SIGTERM, handler)

    def restore():
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)
    return restore


def run_main(main, argv=None):
    """Run main(argv); turn a UserError into `error: ...` on stderr and exit code 2."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:  # imports done: Ctrl-C is KeyboardInterrupt again
        signal.signal(signal.SIGINT, signal.default_int_handler)
    use_utf8_streams()
    try:
        main(argv)
    except UserError as e:
        # one write, so that the ranks of a torchrun job, which all say it, do not cut into each
        # other's lines; each but rank 0's is marked with its rank
        rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"
        sys.stderr.write(f"{f'rank {rank}: ' if rank != '0' else ''}error: {e}\n")
        sys.stderr.flush()
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
    except OSError as e:
        if reader_left(e):  # `python sample.py | head`: the reader left, nothing to report
            _to_null_device(sys.stdout)  # what is still buffered goes nowhere at exit, quietly
            sys.stderr.close()
            sys.exit(0)
        fix = machine_problem(e)
        if fix is None:
            raise
        path = e.filename2 or e.filename  # os.replace(temporary, target): the target
        print(f"error: {e.strerror or e}{f': {path}' if path else ''}; {fix}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:  # settings larger than the machine (torch's and numpy's own errors)
        if not out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        print(f"error: out of memory ({first}); lower what sizes the work: --batch_size, --block_size, "
              f"the model's size, --num_samples", file=sys.stderr)
        sys.exit(2)


# what a failed file operation says that is the machine's or the path's, not ours: the fix
MACHINE_PROBLEMS = {
    errno.ENAMETOOLONG: "choose a shorter path (a shorter --out_dir, --name or file name)",
    errno.ENOSPC: "free some space on that disk, or write to another one",
    errno.EROFS: "that disk is read-only: choose a folder you can write to",
    errno.EACCES: "you may not use that path: choose another, or change its permissions",
}
if hasattr(errno, "EDQUOT"):  # a disk quota (not every OS names it)
    MACHINE_PROBLEMS[errno.EDQUOT] = "free some of your disk quota, or write to another disk"


def machine_problem(e: OSError) -> str | None:
    """How to fix a file operation that failed for the machine's or the path's reasons (a name
    too long, a full or read-only disk, a path without permission); None for anything else."""
    if getattr(e, "winerror", None) == 206:  # Windows: ERROR_FILENAME_EXCED_RANGE
        return MACHINE_PROBLEMS[errno.ENAMETOOLONG]
    if os.name == "nt" and e.errno == errno.EINVAL and e.filename:  # ERROR_INVALID_NAME, and its kin
        return 'Windows refuses that name: no < > : " | ? * in a file or folder name'
    if os.name == "nt" and e.errno == errno.EACCES:
        return MACHINE_PROBLEMS[errno.EACCES] + " (or another program has it open: close it)"
    return MACHINE_PROBLEMS.get(e.errno)


def out_of_memory(e: BaseException) -> bool:
    """Whether e is an allocation that failed: numpy's MemoryError, torch's CPU allocator, a GPU's."""
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or any(
        marker in text for marker in ("can't allocate memory", "out of memory", "Out of memory"))
