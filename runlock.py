"""One run per folder: a lock that says which process holds the folder.

train.py holds <out_dir>/train.lock while it trains (under torchrun, rank 0 holds it for
the job); prepare.py holds <data_dir>/.<name>.lock while it builds data/<name>/. A second
run on the same folder stops at once with one line naming the holder and what to do:

    error: --out_dir out is in use by PID 4242 on host gpu1 since 2026-11-29 08:50:01
    (python train.py configs/shakespeare.py); wait for it to finish, stop it (kill 4242),
    or choose another --out_dir

Two files do this, the same way on Linux, macOS and Windows:

- The note (train.lock, JSON: pid, host, started, command) names the holder. The holder
  writes it once it has the lock and deletes it when it lets go. A note found by the
  process that just took the lock was left by a run that was killed; it is taken over with
  a one-line notice that says whether its PID is gone or it was written on another host.
- The lock is an OS lock on a hidden file beside the note (out/.train.lock.flock), taken
  with filelock's lock_descriptor (flock on Linux and macOS, LockFileEx on Windows). The OS
  drops it when its process ends, however it ends (kill -9 too), so a lock is never held by
  a dead process. It is a file of its own because Windows' lock keeps other processes from
  reading the locked file, and the note must stay readable.

Where the filesystem has no OS locks, the lock file's existence is the lock (a "soft" lock),
which a killed run leaves behind. It is taken over when the note says its holder ran on this
host and psutil finds that process gone. Whether a process is alive is always psutil's
answer: os.kill(pid, 0) is no probe on Windows (signal 0 is CTRL_C_EVENT).
"""
import contextlib
import errno
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import psutil

with warnings.catch_warnings():  # without fcntl, filelock warns at import that it has no OS lock: see _take_soft
    warnings.simplefilter("ignore")
    import filelock

import durable
from errors import UserError

# errno of a filesystem without OS file locks (filelock raises ENOSYS where Python has no fcntl)
NO_OS_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}


_HELD: set = set()  # the FolderLocks this process holds by an OS lock


def _let_go_in_child():
    """A forked child (prepare.py's encoder workers, under Linux's fork) shares its parent's
    open lock file, and flock's lock lasts while any process has it open: a child left behind
    by a killed parent would hold the folder. The child closes its copy (closing unlocks
    nothing for the parent) and holds nothing."""
    for lock in _HELD:
        with contextlib.suppress(OSError):
            os.close(lock.fd)
        lock.fd, lock.held = None, False
    _HELD.clear()


if hasattr(os, "register_at_fork"):  # POSIX; Windows starts children afresh, without the descriptor
    os.register_at_fork(after_in_child=_let_go_in_child)


def _exit_on_sigterm(signum, frame):
    """SIGTERM outside train.py's loop ends the process through Python, so finally blocks
    (and this lock's release) run; the loop installs its own handler that saves first."""
    sys.exit(128 + signum)


def describe(info: dict) -> str:
    """'PID 4242 on host gpu1 since <time> (<command>)' from a note's contents."""
    started = info.get("started")
    since = (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"
             if isinstance(started, (int, float)) else "")
    command = f" ({info['command']})" if info.get("command") else ""
    return f"PID {info.get('pid', '?')} on host {info.get('host', '?')}{since}{command}"


def command_line(argv: list[str]) -> str:
    """argv as this OS's shell would take it back (quoted for cmd on Windows)."""
    return subprocess.list2cmdline(argv) if os.name == "nt" else shlex.join(argv)


def read_note(path: Path) -> dict | None:
    """The holder's details from the note at path: None when there is no note, {} when it
    cannot be read (another program's file, or Windows refusing a file being replaced)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def pid_alive(pid, since: float | None = None) -> bool:
    """Whether process pid is running on this machine. With since (when that process wrote
    its note), a process that started later is another one that reused the number."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if not isinstance(since, (int, float)) or isinstance(since, bool):  # a note from elsewhere, or damaged: unknown
        since = None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # ended, not yet reaped by its parent
            return False
        # a second of slack: process start times are rounded to the system clock's ticks
        return since is None or process.create_time() <= since + 1
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # alive, but someone else's
        return True


def holder_is_gone(info: dict) -> bool:
    """A note whose process ran on this host and has ended (another host's cannot be checked)."""
    return info.get("host") == socket.gethostname() and not pid_alive(info.get("pid"), info.get("started"))


def same_file(path: Path, fd: int) -> bool:
    """Whether path still names the open file fd (a holder that let go may have deleted it)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


class FolderLock:
    """An exclusive lock on a folder, named by the note at path (see the module docstring).

    what names the folder in messages (e.g. "--out_dir out"); other_choice is the last way
    out offered to a user who finds it taken (e.g. "choose another --out_dir")."""

    def __init__(self, path, what: str, other_choice: str):
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name.lstrip('.')}.flock")
        self.what = what
        self.other_choice = other_choice
        self.fd = None  # the locked lock file; None for a soft lock
        self.soft = False
        self.held = False
        self._previous_sigterm = None

    def acquire(self) -> "FolderLock":
        """Take the lock or raise UserError naming its holder. A no-op when already held."""
        if self.held:
            return self
        self.fd = self._take()
        self.held = True
        if self.fd is not None:
            _HELD.add(self)
        stale = read_note(self.path)
        if stale:
            self._notice_takeover(stale)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": command_line([Path(sys.executable).name, *sys.argv])}
        try:
            durable.write_text(self.path, json.dumps(info) + "\n")
        except OSError as e:
            self.release()
            raise UserError(f"cannot write the lock file {self.path}: {e.strerror or e}; {self._way_out(e)}") from None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def _take(self) -> int | None:
        """Open and lock the lock file and return its descriptor (None: a soft lock was taken),
        or raise UserError naming the holder. Descriptors are not inherited across exec
        (Python's default), and a forked child closes its copy (_let_go_in_child), so a process
        a run starts never holds its lock."""
        for _ in range(100):  # retried only when the file was released and deleted meanwhile
            try:
                try:
                    fd, created = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
                except FileExistsError:
                    fd, created = os.open(self.lock_path, os.O_RDWR), False
            except FileNotFoundError:  # deleted between the two opens: try again
                if not self.lock_path.parent.is_dir():  # unless there is no folder to create it in
                    raise UserError(f"cannot create the lock file {self.lock_path}: the folder "
                                    f"{self.lock_path.parent} does not exist; {self.other_choice}") from None
                continue
            except OSError as e:
                raise UserError(f"cannot create the lock file {self.lock_path}: {e.strerror or e}; "
                                f"{self._way_out(e)}") from None
            try:
                locked = filelock.lock_descriptor(fd, blocking=False)
            except OSError as e:
                os.close(fd)
                if e.errno in NO_OS_LOCKS:  # then creating the file was taking the lock
                    self.soft = True
                    return None if created else self._take_soft()
                raise UserError(f"cannot lock {self.lock_path}: {e.strerror or e}; {self.other_choice}") from None
            if not locked:
                os.close(fd)
                raise UserError(self._busy(read_note(self.path)))
            if same_file(self.lock_path, fd):
                return fd
            filelock.unlock_descriptor(fd)  # we locked a file its holder deleted as it let go
            os.close(fd)
        raise UserError(f"could not take {self.lock_path}: other runs keep taking and releasing it; "
                        f"{self.other_choice}")

    def _way_out(self, e: OSError) -> str:
        """What to do when the lock's files cannot be written: another name is no help on a full disk."""
        return "free some space on that disk first" if e.errno == errno.ENOSPC else self.other_choice

    def _take_soft(self) -> None:
        """Where the filesystem has no OS locks, the lock file's existence is the lock, and it
        exists: take it over if the note's process ran on this host and has ended."""
        holder = read_note(self.path)
        if not (holder and holder_is_gone(holder)):
            raise UserError(self._busy(holder))
        self.lock_path.unlink(missing_ok=True)  # its holder was killed
        try:
            os.close(os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:  # another run took it over first
            raise UserError(self._busy(read_note(self.path))) from None
        except OSError as e:
            raise UserError(f"cannot create the lock file {self.lock_path}: {e.strerror or e}; "
                            f"{self.other_choice}") from None

    def _busy(self, holder: dict | None) -> str:
        who = describe(holder) if holder else "another process (still starting)"
        kill = "taskkill /PID" if os.name == "nt" else "kill"
        stop = f"stop it ({kill} {holder['pid']})" if holder and holder.get("pid") else "stop it"
        checkable = holder and holder.get("host") == socket.gethostname()  # a live process of this host
        gone = (f" (if that run has ended, delete {self.lock_path}: without OS locks here, a run on "
                f"another host, or one that left no note, cannot be checked)" if self.soft and not checkable else "")
        return f"{self.what} is in use by {who}{gone}; wait for it to finish, {stop}, or {self.other_choice}"

    def _notice_takeover(self, stale: dict):
        """A note nobody holds: its run ended without letting go (kill -9, a crash, a
        reboot). Say whose it was, then take it."""
        if stale.get("host") not in (None, socket.gethostname()):
            why = (f"it was written on another host ({stale['host']}), whose process cannot be "
                   f"checked from here, and no process holds it now")
        elif pid_alive(stale.get("pid"), stale.get("started")):
            why = "that process no longer holds it"
        else:
            why = "that process is no longer running"
        print(f"note: taking over the stale lock {self.path} of {describe(stale)}: {why}", file=sys.stderr)

    def release(self):
        """Delete the note, then let go of the lock. Idempotent."""
        if not self.held:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # Windows: another process is reading it; the next holder reports it as stale
            pass
        if self.fd is None:  # a soft lock: the file is the lock
            self.lock_path.unlink(missing_ok=True)
        elif os.name == "nt":  # Windows deletes no open file: let go first (a process that opens it meanwhile keeps it)
            filelock.unlock_descriptor(self.fd)
            os.close(self.fd)
            try:
                self.lock_path.unlink(missing_ok=True)
            except OSError:
                pass
        else:  # delete, then let go: a process that opened it before sees it deleted (see _take)
            if same_file(self.lock_path, self.fd):
                self.lock_path.unlink(missing_ok=True)
            filelock.unlock_descriptor(self.fd)
            os.close(self.fd)
        _HELD.discard(self)
        self.fd = None
        self.held = False
        if self._previous_sigterm is not None:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
