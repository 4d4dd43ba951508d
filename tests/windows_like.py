"""A Python that looks like Windows where portable code must not care.

tests/test_portable.py copies this file as sitecustomize.py into a folder it puts first on
PYTHONPATH, so every Python started with that environment (the stage scripts, and the
worker processes they spawn) runs it at startup. Code under WINDOWS_LIKE_ROOT (the
project: files there outside any site-packages) then finds

- no fcntl (for everyone: filelock falls back to its soft lock, as on a system without
  OS file locks), and no os.O_CLOEXEC, os.sysconf, os.getuid, os.getpgid or os.fork;
- os.kill(pid, 0) failing: on Windows signal 0 is CTRL_C_EVENT, no probe of a process;
- os.open of a folder refused with PermissionError (for everyone, as Windows refuses it);
- text files opened without an encoding read and written as cp1252, Windows' default in
  Western Europe and the Americas, and stdin, stdout and stderr in cp1252 as well;
- processes started by spawning, not forking (multiprocessing's start method on Windows
  and macOS).

Libraries keep their Linux code, as on Windows they would run their Windows code.
"""
import builtins
import errno
import inspect
import io
import multiprocessing
import os
import pathlib
import shutil
import sys

ROOT = os.environ["WINDOWS_LIKE_ROOT"]
HIDDEN = {"O_CLOEXEC", "sysconf", "getuid", "getpgid", "fork"}
ANSI = "cp1252"


def from_project(depth: int) -> bool:
    """Whether the code depth frames up from the caller of this function is the project's."""
    try:
        filename = sys._getframe(depth + 1).f_code.co_filename
    except ValueError:  # the stack is not that deep
        return False
    return filename.startswith(ROOT) and "site-packages" not in filename


class WindowsLikeOS(type(os)):
    def __getattribute__(self, name):
        if name in HIDDEN and from_project(1):
            raise AttributeError(f"module 'os' has no attribute {name!r} (as on Windows)")
        return super().__getattribute__(name)


os.__class__ = WindowsLikeOS
sys.modules["fcntl"] = None  # `import fcntl` raises ModuleNotFoundError
_kill, _open = os.kill, os.open


def kill(pid, sig):
    if sig == 0 and from_project(1):
        raise OSError(errno.EINVAL, "os.kill(pid, 0) sends CTRL_C_EVENT on Windows; it probes no process")
    return _kill(pid, sig)


def open_refusing_folders(path, flags, mode=0o777, *, dir_fd=None):
    if dir_fd is None and os.path.isdir(path):
        raise PermissionError(errno.EACCES, "Permission denied (Windows opens no folder)", path)
    return _open(path, flags, mode, dir_fd=dir_fd)


os.kill, os.open = kill, open_refusing_folders
shutil._use_fd_functions = False  # rmtree walks folders by name, as on Windows


def ansi_by_default(function, depth: int = 1):
    """function, except that a text-mode call from the project without an encoding gets cp1252."""
    signature = inspect.signature(function)

    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        mode = bound.arguments.get("mode", "r")
        text = "b" not in mode if isinstance(mode, str) else True
        if text and bound.arguments.get("encoding") is None and from_project(depth):
            bound.arguments["encoding"] = ANSI
        return function(*bound.args, **bound.kwargs)
    return wrapper


builtins.open = io.open = ansi_by_default(io.open)
for _name in ("open", "read_text", "write_text"):
    setattr(pathlib.Path, _name, ansi_by_default(getattr(pathlib.Path, _name)))
for _stream in (sys.stdin, sys.stdout, sys.stderr):
    if isinstance(_stream, io.TextIOWrapper):
        _stream.reconfigure(encoding=ANSI)
multiprocessing.set_start_method("spawn", force=True)
