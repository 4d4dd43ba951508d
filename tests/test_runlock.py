"""One run per folder: a second train.py or prepare.py on a busy folder stops with one line
naming the holder; a lock its holder left behind (killed, or from another host) is taken over."""
import contextlib
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import checkpoint
import prepare
import runlock
import train
from conftest import TINY, write_char_dataset
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent

# A process that takes a lock with runlock and holds it until it is killed (no torch: starts fast).
HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import runlock
runlock.FolderLock(sys.argv[2], "the folder", "choose another").acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def hold_lock():
    """hold_lock(path) -> the Popen of a process holding the lock at path; all killed at the end."""
    procs = []

    def start(path):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # bounded: a hung holder fails the test
        assert ready and proc.stdout.readline() == "held\n", "the lock holder did not start"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.communicate(timeout=30)


def run_train(data_dir, out_dir, *flags):
    train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *flags])


def test_second_run_is_refused_naming_the_first(tiny_data, tmp_path, hold_lock, capsys):
    out = tmp_path / "out"
    run_train(tiny_data, out, "--max_iters=2", "--eval_interval=2")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    holder = hold_lock(out / "train.lock")
    capsys.readouterr()
    for flags in (["--max_iters=4"], ["--max_iters=4", "--init_from=resume"]):
        with pytest.raises(UserError) as e:
            run_train(tiny_data, out, *flags)
        message = str(e.value)
        assert f"--out_dir {out} is in use by PID {holder.pid} on host {socket.gethostname()}" in message
        assert f"kill {holder.pid}" in message and "choose another --out_dir" in message
        assert "\n" not in message
        assert capsys.readouterr().out == ""  # refused before it prints its config
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name not in ("train.lock", ".train.lock.flock")}
    assert after == before  # the holder's folder is untouched (but for the holder's own lock files)


def test_lock_of_a_killed_run_is_taken_over(tiny_data, tmp_path, hold_lock, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = hold_lock(out / "train.lock")
    os.kill(holder.pid, signal.SIGKILL)  # no chance to clean up: the file stays
    holder.wait(timeout=30)
    assert json.loads((out / "train.lock").read_text())["pid"] == holder.pid
    run_train(tiny_data, out, "--max_iters=2", "--eval_interval=2")
    err = capsys.readouterr().err
    assert f"taking over the stale lock {out / 'train.lock'} of PID {holder.pid}" in err
    assert "no longer running" in err
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 2
    assert not (out / "train.lock").exists() and not (out / ".train.lock.flock").exists()  # released at the end


def test_lock_from_another_host_is_taken_over_and_says_so(tmp_path, capsys):
    path = tmp_path / "train.lock"
    path.write_text(json.dumps({"pid": 12345, "host": "elsewhere.example", "started": time.time(),
                                "command": "python train.py"}))
    with runlock.FolderLock(path, "the folder", "choose another"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PID 12345 on host elsewhere.example" in err[0] and "another host" in err[0]
    assert not path.exists()


def test_lock_is_released_when_the_run_fails(tiny_data, tmp_path):
    out = tmp_path / "out"
    run_train(tiny_data, out, "--max_iters=2", "--eval_interval=2")
    write_char_dataset(tiny_data, "abcd" * 1000, name="other")  # another vocabulary
    with pytest.raises(UserError, match="resume on the dataset it was trained on"):  # found after the lock is taken
        run_train(tiny_data, out, "--max_iters=4", "--init_from=resume", "--dataset=other")
    assert not (out / "train.lock").exists()
    run_train(tiny_data, out, "--max_iters=4", "--init_from=resume")  # the folder is free again
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 4


def test_prepare_refuses_a_dataset_being_prepared(tmp_path, hold_lock):
    text = tmp_path / "input.txt"
    text.write_text("to be or not to be, that is the question\n" * 50)
    args = ["--input", str(text), "--name", "x", "--tokenizer", "char", "--block_size=8",
            "--data_dir", str(tmp_path / "data"), "--num_workers=1"]
    prepare.main(args)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data" / "x").iterdir()}
    holder = hold_lock(tmp_path / "data" / ".x.lock")
    with pytest.raises(UserError, match=f"dataset folder .*x is in use by PID {holder.pid}"):
        prepare.main(args)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data" / "x").iterdir()} == before
    assert not [p for p in (tmp_path / "data").iterdir() if ".tmp-" in p.name]  # its temp folder went too
    holder.kill()
    holder.wait(timeout=30)
    prepare.main(args)  # a stale lock: taken over
    assert not (tmp_path / "data" / ".x.lock").exists()


def test_a_process_is_alive_while_it_runs_and_only_if_it_began_before_its_note():
    began = psutil.Process().create_time()
    assert runlock.pid_alive(os.getpid()) and runlock.pid_alive(os.getpid(), since=began)
    assert runlock.pid_alive(os.getpid(), since=began - 1)  # start times are rounded: a second of slack
    assert not runlock.pid_alive(os.getpid(), since=began - 1.5)  # began after the note: its PID was reused
    for pid in (None, "4242", 0, -1, 1.0):  # not a PID a note can name
        assert not runlock.pid_alive(pid)
    if psutil.pid_exists(1):  # a run in a container can be PID 1
        assert runlock.pid_alive(1)
    ended = subprocess.Popen([sys.executable, "-c", ""])
    if os.name != "nt":  # POSIX: an ended child is a zombie until its parent reaps it
        for _ in range(3000):
            if psutil.Process(ended.pid).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.01)
        assert not runlock.pid_alive(ended.pid)
    ended.wait()
    assert not runlock.pid_alive(ended.pid)


def test_a_stale_note_of_a_live_process_says_that_it_no_longer_holds_the_lock(tmp_path, capsys):
    path = tmp_path / "train.lock"
    for started, why in ((time.time(), "that process no longer holds it"),
                         (psutil.Process().create_time() - 3600, "that process is no longer running")):  # a reused PID
        note = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        path.write_text(json.dumps(note))
        with runlock.FolderLock(path, "the folder", "choose another"):
            pass
        assert capsys.readouterr().err == f"note: taking over the stale lock {path} of {runlock.describe(note)}: {why}\n"


def test_a_note_names_its_holder_and_an_unreadable_note_is_empty(tmp_path):
    started = time.mktime((2026, 11, 29, 8, 50, 1, 0, 0, -1))  # local time
    note = {"pid": 4242, "host": "gpu1", "started": started, "command": "python train.py"}
    assert runlock.describe(note) == "PID 4242 on host gpu1 since 2026-11-29 08:50:01 (python train.py)"
    assert runlock.describe({"started": "yesterday"}) == "PID ? on host ?"
    path = tmp_path / "train.lock"
    assert runlock.read_note(path) is None
    for text in ("{not json", "[4242]"):
        path.write_text(text)
        assert runlock.read_note(path) == {}
    if os.name != "nt":
        assert runlock.command_line(["python", "train.py", "--out_dir=my runs"]) == "python train.py '--out_dir=my runs'"


def test_an_in_process_lock_names_its_file_writes_a_full_note_and_handles_sigterm_while_held(tmp_path):
    """The lock file sits beside the note with one leading dot; the note holds pid, host, start
    and command; SIGTERM ends the process through Python (so finally blocks release the lock)
    only while the lock is held and only where no handler was set; a second acquire is a no-op."""
    for name, lock_name in (("train.lock", ".train.lock.flock"), (".prepare.lock", ".prepare.lock.flock"),
                            (".Xsum.lock", ".Xsum.lock.flock")):  # --name Xsum must not share sum's lock file
        assert runlock.FolderLock(tmp_path / name, "the folder", "choose another").lock_path == tmp_path / lock_name
    path = tmp_path / "train.lock"
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        lock = runlock.FolderLock(path, "the folder", "choose another")
        assert not lock.held and not lock.soft and lock.fd is None
        with lock:
            note = json.loads(path.read_text())
            assert note["pid"] == os.getpid() and note["host"] == socket.gethostname()
            assert time.time() - 60 < note["started"] <= time.time() and "python" in note["command"]
            assert (lock.held, lock.soft, lock.lock_path.exists()) == (True, False, True)
            assert lock.acquire() is lock and isinstance(lock.fd, int)  # already held: nothing changes
            assert signal.getsignal(signal.SIGTERM) is runlock._exit_on_sigterm
            with pytest.raises(SystemExit) as e:
                runlock._exit_on_sigterm(signal.SIGTERM, None)
            assert e.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back on release
        assert not path.exists() and not lock.lock_path.exists() and not lock.held
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a handler of the program's own is left alone
        with lock:  # the same lock taken again
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_second_lock_in_the_same_process_is_refused_and_the_first_lets_go_cleanly(tmp_path):
    """The OS lock is per open file, so a second FolderLock on a held path is refused even in
    the holder's own process, with the holder named (or "still starting" while it has no note);
    a released lock object can be taken again."""
    path = tmp_path / "train.lock"
    first = runlock.FolderLock(path, "the folder", "choose another")
    with first:
        note = json.loads(path.read_text())
        for _ in range(2):
            with pytest.raises(UserError) as e:
                runlock.FolderLock(path, "the folder", "choose another").acquire()
            assert str(e.value) == (f"the folder is in use by {runlock.describe(note)}; wait for it to finish, "
                                    f"stop it (kill {os.getpid()}), or choose another")
        assert json.loads(path.read_text()) == note and first.lock_path.exists()  # the holder is untouched
        path.unlink()  # a holder that has not written its note yet
        with pytest.raises(UserError) as e:
            runlock.FolderLock(path, "the folder", "choose another").acquire()
        assert str(e.value) == ("the folder is in use by another process (still starting); wait for it to "
                                "finish, stop it, or choose another")
        fd = first.fd
    with pytest.raises(OSError):  # let go of: the lock file's descriptor is closed
        os.fstat(fd)
    assert not first.lock_path.exists() and not first.held
    with first:  # the same object takes the lock again
        assert json.loads(path.read_text())["pid"] == os.getpid() and first.held
    assert not path.exists() and not first.lock_path.exists()


@pytest.mark.skipif(os.name == "nt", reason="Windows deletes no open file")
def test_a_lock_file_deleted_by_hand_while_held_is_not_deleted_again_by_the_old_holder(tmp_path):
    path = tmp_path / "train.lock"
    old = runlock.FolderLock(path, "the folder", "choose another").acquire()
    old.lock_path.unlink()
    path.unlink()
    with runlock.FolderLock(path, "the folder", "choose another") as new:
        old.release()  # must leave the new holder's lock file alone
        assert new.lock_path.exists() and same_inode(new.lock_path, new.fd)
        with pytest.raises(UserError, match="in use by"):
            runlock.FolderLock(path, "the folder", "choose another").acquire()
    assert not new.lock_path.exists()


def same_inode(path, fd):
    return os.path.samestat(os.stat(path), os.fstat(fd))


def test_a_note_or_lock_file_that_cannot_be_written_is_refused_in_one_line(tmp_path):
    """A folder where the note or the lock file should be: the error names the file and the OS's
    reason, and nothing is left held."""
    path = tmp_path / "train.lock"
    path.mkdir()
    lock = runlock.FolderLock(path, "the folder", "choose another")
    with pytest.raises(UserError) as e:
        lock.acquire()
    assert str(e.value).startswith(f"cannot write the lock file {path}: ") and str(e.value).endswith("; choose another")
    assert "Errno" not in str(e.value) and "\n" not in str(e.value)
    assert not lock.held and not lock.lock_path.exists()
    path.rmdir()
    lock.lock_path.mkdir()
    with pytest.raises(UserError) as e:
        lock.acquire()
    assert str(e.value).startswith(f"cannot create the lock file {lock.lock_path}: ") and str(e.value).endswith("; choose another")
    assert "Errno" not in str(e.value) and "\n" not in str(e.value)
    assert not lock.held and not path.exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_the_lock_file_is_readable_by_all_and_writable_by_its_owner_only(tmp_path):
    umask = os.umask(0o022)
    try:
        with runlock.FolderLock(tmp_path / "train.lock", "the folder", "choose another") as lock:
            assert stat.S_IMODE(os.stat(lock.lock_path).st_mode) == 0o644
    finally:
        os.umask(umask)


def test_a_lock_in_a_folder_that_does_not_exist_says_so(tmp_path):
    lock = runlock.FolderLock(tmp_path / "missing" / "train.lock", "the folder", "choose another")
    with pytest.raises(UserError) as e:
        lock.acquire()
    assert str(e.value) == (f"cannot create the lock file {tmp_path / 'missing' / '.train.lock.flock'}: the folder "
                            f"{tmp_path / 'missing'} does not exist; choose another")
    assert not lock.held


# prepare.py's encoder workers, forked from a process that holds the dataset's lock
FORKS = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import prepare, runlock
from tokenizer import Tokenizer
runlock.FolderLock(sys.argv[2], "the folder", "choose another").acquire()
pool = prepare.EncoderPool(Tokenizer.char_from_text("ab"), 2)
print(" ".join(str(p) for p in pool._processes), flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork start method: POSIX")
def test_workers_of_a_killed_prepare_neither_hold_its_lock_nor_outlive_it(tmp_path):
    """kill -9 (or the OOM killer) of prepare.py: its forked workers held the dataset's lock
    (flock lasts while any process has the file open) and waited for work forever, so the next
    prepare.py was refused, naming a PID that no longer existed."""
    note = tmp_path / ".data.lock"
    proc = subprocess.Popen([sys.executable, "-c", FORKS, str(ROOT), str(note)], stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "the pool did not start"
        workers = [psutil.Process(int(pid)) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2
        proc.kill()
        proc.wait(timeout=30)  # (not communicate: the workers hold the other end of its stdout)
        lock = runlock.FolderLock(note, "the folder", "choose another").acquire()  # the workers still live
        lock.release()
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, "a worker outlived its killed parent"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        for w in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                w.kill()


@pytest.mark.skipif(os.name == "nt", reason="a process group's signals: POSIX")
@pytest.mark.parametrize("signals,to_group,code,last_line", [
    ((signal.SIGINT, signal.SIGINT), True, 130, "interrupted"), ((signal.SIGTERM,), True, 143, "terminated"),
    ((signal.SIGINT, signal.SIGTERM), False, 143, "terminated")])
def test_prepare_leaves_at_a_second_ctrl_c_while_its_workers_stop(tmp_path, shakespeare_text, signals, to_group,
                                                                   code, last_line):
    """Ctrl-C twice (an impatient user) while prepare.py encodes: the second landed inside the
    pool's shutdown and the process hung at exit, forever; so did a `kill` after a Ctrl-C. Now:
    `interrupted` (130) or `terminated` (143, it used to end with no word), nothing written, no
    worker left."""
    big = tmp_path / "big.txt"
    big.write_text(shakespeare_text * 40, encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), f"--input={big}", "--name=big",
                             f"--data_dir={tmp_path / 'data'}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        for line in proc.stdout:  # the vocabulary is said just before the encoding starts
            if line.startswith("vocab size"):
                break
        time.sleep(0.5)
        workers = psutil.Process(proc.pid).children()
        assert proc.poll() is None and workers, "the encoding ended before the test could stop it"
        for sig in signals:  # as a terminal sends Ctrl-C (to every process of the group), or `kill PID`
            os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig)
            time.sleep(0.1)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
    assert proc.returncode == code and out.rstrip().endswith(last_line) and "Traceback" not in out, out
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive
    assert not (tmp_path / "data" / "big").exists() and not list((tmp_path / "data").glob(".*tmp*"))


def test_a_full_disk_says_to_free_space_not_to_choose_another_name(tmp_path, monkeypatch):
    """prepare.py on a full disk: another --name is no help (the OS's ENOSPC, raised here)."""
    import errno

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(runlock.durable, "write_text", full)
    lock = runlock.FolderLock(tmp_path / ".data.lock", "dataset folder data", "choose another --name")
    with pytest.raises(UserError) as e:
        lock.acquire()
    assert str(e.value) == (f"cannot write the lock file {tmp_path / '.data.lock'}: No space left on device; "
                            f"free some space on that disk first")
    assert not lock.held


def test_a_process_of_another_user_is_alive_and_pid_0_is_nobodys(monkeypatch):
    """psutil's AccessDenied means the process exists (someone else's): its lock is not taken
    over. PID 0 (the kernel's, on macOS and Windows) is never a note's holder, whatever psutil says."""
    probed = []

    class Someone:
        def __init__(self, pid):
            probed.append(pid)

        def status(self):
            raise psutil.AccessDenied(4242)

    monkeypatch.setattr(runlock.psutil, "Process", Someone)
    assert runlock.pid_alive(4242) and runlock.pid_alive(4242, since=time.time())
    assert not runlock.holder_is_gone({"host": socket.gethostname(), "pid": 4242, "started": time.time()})

    class Running:
        def __init__(self, pid):
            probed.append(pid)

        def status(self):
            return psutil.STATUS_RUNNING

        def create_time(self):
            return 0.0

    monkeypatch.setattr(runlock.psutil, "Process", Running)
    probed.clear()
    assert not runlock.pid_alive(0) and probed == []


def test_a_lock_file_deleted_as_it_is_locked_is_opened_again(tmp_path, monkeypatch):
    """A holder that lets go deletes its lock file: a lock taken on that deleted file holds
    nothing, so the lock file is opened (created) again and that one is locked."""
    path = tmp_path / "train.lock"
    lock = runlock.FolderLock(path, "the folder", "choose another")
    real_lock, calls = runlock.filelock.lock_descriptor, []

    def deleted_first(fd, blocking):
        calls.append(fd)
        if len(calls) == 1:
            lock.lock_path.unlink()  # the previous holder let go meanwhile
        return real_lock(fd, blocking=blocking)

    monkeypatch.setattr(runlock.filelock, "lock_descriptor", deleted_first)
    with lock:
        assert len(calls) == 2 and same_inode(lock.lock_path, lock.fd)
        monkeypatch.undo()
        with pytest.raises(UserError, match="in use by"):
            runlock.FolderLock(path, "the folder", "choose another").acquire()
    assert not path.exists() and not lock.lock_path.exists()


def test_releasing_twice_leaves_the_next_holder_alone(tmp_path):
    path = tmp_path / "train.lock"
    first = runlock.FolderLock(path, "the folder", "choose another").acquire()
    first.release()
    with runlock.FolderLock(path, "the folder", "choose another") as second:
        note = path.read_text()
        first.release()  # a stray second release (a finally block and an atexit, say)
        assert path.read_text() == note and same_inode(second.lock_path, second.fd)
        with pytest.raises(UserError, match="in use by"):
            runlock.FolderLock(path, "the folder", "choose another").acquire()


def test_a_stale_note_without_a_host_is_taken_as_this_hosts(tmp_path, capsys):
    """A note that names no host (hand-written, or cut short) is not said to come from another host."""
    path = tmp_path / "train.lock"
    path.write_text(json.dumps({"pid": 1 << 30}))
    with runlock.FolderLock(path, "the folder", "choose another"):
        pass
    assert capsys.readouterr().err.strip().endswith("that process is no longer running")


def test_a_soft_lock_in_one_process_is_taken_refused_for_a_live_holder_and_released(tmp_path, monkeypatch):
    """Where the filesystem has no OS locks (ENOSYS), creating the lock file takes the lock; a
    second taker is refused naming the live holder of this host, without the advice to delete
    the file that only a run that cannot be checked gets."""
    import errno

    def no_os_locks(fd, blocking):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(runlock.filelock, "lock_descriptor", no_os_locks)
    path = tmp_path / "train.lock"
    with runlock.FolderLock(path, "the folder", "choose another") as lock:
        assert lock.soft and lock.fd is None and lock.lock_path.exists()
        with pytest.raises(UserError) as e:
            runlock.FolderLock(path, "the folder", "choose another").acquire()
        assert str(e.value).startswith(f"the folder is in use by PID {os.getpid()} on host {socket.gethostname()}")
        assert "if that run has ended" not in str(e.value)
    assert not path.exists() and not lock.lock_path.exists()


def test_a_note_whose_start_time_is_not_a_number_is_read_as_unknown():
    """A lock note is another process's file, perhaps damaged or written by another tool: a
    `started` that is not a number is no crash (a live process is still alive)."""
    assert runlock.pid_alive(os.getpid(), "2026-11-29T08:50:01") is True
    assert runlock.pid_alive(os.getpid(), True) is True
    assert runlock.holder_is_gone({"pid": os.getpid(), "host": socket.gethostname(), "started": "yesterday"}) is False


def test_a_whole_number_start_time_is_a_time():
    """A note's `started` written as an int (a whole second, another tool's): this process started
    after 1970, so a note of then is another process that had this number."""
    assert runlock.pid_alive(os.getpid(), 0) is False
    assert runlock.pid_alive(os.getpid(), int(time.time()) + 5) is True
