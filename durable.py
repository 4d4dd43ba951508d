"""Atomic, durable file writes that behave the same on Linux, macOS and Windows.

A file is written beside its final name, flushed and fsync'd, then renamed over it with
os.replace, so a reader (or a run that restarts after a crash) sees the old file or the new
one, never half of one. On POSIX the folder is fsync'd too, which makes the rename itself
survive a power cut. Windows cannot open a folder as a file (and so cannot fsync one); there
the step is skipped: os.replace is atomic on NTFS, and its journal makes the rename durable
shortly after.

No torch here: prepare.py's worker processes import this module's importers.
"""
import contextlib
import errno
import glob
import os
import time
from pathlib import Path

# Windows refuses to replace a file that another process has open (a sample.py or app.py
# reading the checkpoint, a virus scanner): such a reader is gone in moments, so try again
# for a while before calling it a failure.
REPLACE_TRIES = 10
REPLACE_WAIT = 0.1  # seconds between tries


def file_in_the_way(path) -> Path | None:
    """The nearest existing folder above path when it is a file (so path cannot be made), else None."""
    above = next((p for p in Path(path).parents if p.exists()), None)
    return above if above is not None and not above.is_dir() else None


def fsync_file(path) -> None:
    """Flush a file's contents to disk. Opened for writing: Windows fsyncs only writable handles."""
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def fsync_folder(folder) -> None:
    """Make renames in folder durable where the OS allows it (POSIX); a no-op where a folder
    cannot be opened (Windows) or its filesystem refuses to fsync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):  # Windows: a folder is not something it opens
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def replace(tmp, path) -> None:
    """os.replace(tmp, path), retried while Windows says another process has path open; then
    the folder's fsync."""
    for attempt in range(REPLACE_TRIES):
        try:
            os.replace(tmp, path)
            break
        except PermissionError:
            if attempt == REPLACE_TRIES - 1:
                raise
            time.sleep(REPLACE_WAIT)
    fsync_folder(Path(path).parent)


@contextlib.contextmanager
def replacing(path):
    """`with durable.replacing(path) as f:` writes f (binary) beside path; when the block ends,
    f is flushed, fsync'd and renamed over path. On any error the temporary file goes and path
    is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    for stale in path.parent.glob(f"{glob.escape('.' + path.name)}.tmp-*"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> None:
    """Replace path's contents with text as UTF-8 (whatever the OS's default encoding is),
    atomically and durably."""
    with replacing(path) as f:
        f.write(text.encode("utf-8"))
