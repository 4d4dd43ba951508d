"""One run per folder: a lock file that says which process holds the folder.

train.py holds <out_dir>/train.lock while it trains (under torchrun, rank 0 holds it for
the job); prepare.py holds <data_dir>/.<name>.lock while it builds data/<name>/. A second
run on the same folder stops at once with one line naming the holder and what to do:

    error: --out_dir out is in use by PID 4242 on host gpu1 since 2026-11-29 08:50:01
    (python train.py configs/shakespeare.py); wait for it to finish, stop it (kill 4242),
    or choose another --out_dir

The lock is fcntl.flock on the open lock file, not the file's existence: the kernel drops
it when its process ends, however it ends (kill -9 too), so a lock is never held by a dead
process and taking over a stale one needs no guesswork about PIDs. The file's contents
(JSON: pid, host, started, command) only say who holds it. A file left behind by a killed
run is taken over with a one-line notice that says whether its PID is gone or it was
written on another host (a folder on a shared filesystem).
"""
import errno
import fcntl
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from errors import UserError


def _exit_on_sigterm(signum, frame):
    """SIGTERM outside train.py's loop ends the process through Python, so finally blocks
    (and this lock's release) run; the loop installs its own handler that saves first."""
    sys.exit(128 + signum)


def describe(info: dict) -> str:
    """'PID 4242 on host gpu1 since <time> (<command>)' from a lock file's contents."""
    started = info.get("started")
    since = (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"
             if isinstance(started, (int, float)) else "")
    command = f" ({info['command']})" if info.get("command") else ""
    return f"PID {info.get('pid', '?')} on host {info.get('host', '?')}{since}{command}"


def _read(fd: int) -> dict | None:
    """The holder's details, or None when the file is empty (released, or not written yet)."""
    try:
        text = os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace")
        info = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) or info is None else {}


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:  # kill(0 or -n) would signal process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


class FolderLock:
    """An exclusive lock on a folder, held through the lock file at path.

    what names the folder in messages (e.g. "--out_dir out"); other_choice is the last way
    out offered to a user who finds it taken (e.g. "choose another --out_dir")."""

    def __init__(self, path, what: str, other_choice: str):
        self.path = Path(path)
        self.what = what
        self.other_choice = other_choice
        self.fd = None
        self._previous_sigterm = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> "FolderLock":
        """Take the lock or raise UserError naming its holder. A no-op when already held."""
        if self.held:
            return self
        for _ in range(100):  # retried only when the file was released and replaced meanwhile
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise UserError(f"cannot create the lock file {self.path}: {e.strerror}; "
                                f"{self.other_choice}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"cannot lock {self.path}: {e.strerror}; {self.other_choice}") from None
                who = describe(holder) if holder else "another process (still starting)"
                stop = f"stop it (kill {holder['pid']})" if holder and holder.get("pid") else "stop it"
                raise UserError(f"{self.what} is in use by {who}; wait for it to finish, {stop}, "
                                f"or {self.other_choice}") from None
            # we hold a lock on this inode; it is the lock only if the path still names it
            # (a holder that just released unlinked it, and a third process may have made a new one)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise UserError(f"could not take {self.path}: other runs keep taking and releasing it; "
                            f"{self.other_choice}")
        stale = _read(fd)
        if stale:
            self._notice_takeover(stale)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": shlex.join([Path(sys.executable).name, *sys.argv])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def _notice_takeover(self, stale: dict):
        """A lock file nobody holds: its run ended without releasing it (kill -9, a crash, a
        reboot). Say whose it was, then take it."""
        if stale.get("host") not in (None, socket.gethostname()):
            why = (f"it was written on another host ({stale['host']}), whose process cannot be "
                   f"checked from here, and no process holds it now")
        elif _pid_alive(stale.get("pid")):
            why = "that process no longer holds it"
        else:
            why = "that process is no longer running"
        print(f"note: taking over the stale lock {self.path} of {describe(stale)}: {why}", file=sys.stderr)

    def release(self):
        """Delete the lock file and drop the lock (in that order, see acquire). Idempotent."""
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self._previous_sigterm is not None:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
