"""Runs on the user's own computer: the whole pipeline on a Python made to look like Windows
(tests/windows_like.py: no fcntl, os.sysconf, os.getuid, os.getpgid, os.O_CLOEXEC or fork,
os.kill(pid, 0) and os.open of a folder refused, cp1252 as the default text encoding,
spawned worker processes), in a folder whose path has spaces, a backslash and non-ASCII
letters; and the run lock on both of its code paths: the OS lock, and the soft lock that
filelock falls back to without one."""
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import durable
import hardware
import runlock
from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory) -> Path:
    """A folder holding tests/windows_like.py as sitecustomize.py."""
    folder = tmp_path_factory.mktemp("windows_like")
    shutil.copy(ROOT / "tests" / "windows_like.py", folder / "sitecustomize.py")
    return folder


def environment(kind: str, sim_dir: Path, project=ROOT) -> dict:
    """The environment of a subprocess: this Python as it is ("normal"), or made to look like
    Windows for the code under project ("windows_like")."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kind == "windows_like":
        env.update(PYTHONPATH=str(sim_dir), WINDOWS_LIKE_ROOT=str(project))
    return env


PROBE = """
import json, multiprocessing, os, sys
found = {"fcntl": True}
try:
    import fcntl
except ImportError:
    found["fcntl"] = False
found.update({name: hasattr(os, name) for name in ("O_CLOEXEC", "sysconf", "getuid", "getpgid", "fork")})
try:
    os.kill(os.getpid(), 0)
    found["kill0"] = "probed"
except OSError:
    found["kill0"] = "refused"
try:
    os.close(os.open(".", os.O_RDONLY))
    found["open_folder"] = "opened"
except PermissionError:
    found["open_folder"] = "refused"
with open("x.txt", "w") as f:
    f.write("\\u00e9")
found["default_encoding"] = open("x.txt", "rb").read().hex()
found["start_method"] = multiprocessing.get_start_method()
print(json.dumps(found))
"""


def test_the_windows_like_python_hides_the_posix_pieces(sim_dir, tmp_path):
    (tmp_path / "probe.py").write_text(PROBE, encoding="utf-8")
    for kind, expected in (("windows_like", {"fcntl": False, "O_CLOEXEC": False, "sysconf": False,
                                             "getuid": False, "getpgid": False, "fork": False,
                                             "kill0": "refused", "open_folder": "refused",
                                             "default_encoding": "e9", "start_method": "spawn"}),
                           ("normal", {"fcntl": True, "sysconf": True, "kill0": "probed", "open_folder": "opened",
                                       "default_encoding": "c3a9"})):
        out = subprocess.run([sys.executable, "probe.py"], cwd=tmp_path, env=environment(kind, sim_dir, tmp_path),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        found = json.loads(out.stdout)
        assert {k: found[k] for k in expected} == expected, kind


# ---------------------------------------------------------------------------- the pipeline

def script(name: str, *args) -> list[str]:
    return [sys.executable, str(ROOT / name), *map(str, args)]


def run(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, timeout=300, encoding="utf-8")


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"the run ended before writing {path.name}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {path} after {seconds} s"
        time.sleep(0.1)


def test_pipeline_on_a_windows_like_python(sim_dir, tmp_path, shakespeare_text):
    """prepare (spawned workers), train, a second run refused naming the first, kill -9, resume
    (taking over the stale lock), sample, export --format=hf and sample the export."""
    env = environment("windows_like", sim_dir)
    base = tmp_path / "my runs\\é x"  # a space, a backslash (a separator on Windows) and an accent
    base.mkdir()
    (base / "input.txt").write_text(shakespeare_text[:30_000] + "\ncafé naïve — ✓ 東京\n", encoding="utf-8")
    data, out, hf = base / "data", base / "out\\a b", base / "hf x"

    done = run(script("prepare.py", "--input", base / "input.txt", "--name", "tiny", "--tokenizer", "char",
                      "--block_size=32", "--data_dir", data, "--num_workers=2", "--chunk_size=4096"), env, base)
    assert done.returncode == 0, done.stderr
    assert "✓" in json.loads((data / "tiny" / "meta.json").read_text(encoding="utf-8"))["chars"]

    train = script("train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--eval_interval=5")
    first = subprocess.Popen(train + ["--max_iters=100000"], env=env, cwd=base,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(out / "ckpt.pt", first)
        second = run(train + ["--max_iters=10"], env, base)
        assert second.returncode == 2
        assert second.stderr.startswith(f"error: --out_dir {out} is in use by PID {first.pid} on host "
                                        f"{socket.gethostname()}"), second.stderr
        assert second.stderr.count("\n") == 1 and f"kill {first.pid}" in second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.kill()
        first.wait(timeout=60)
    iter_num = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]

    resumed = run(train + ["--init_from=resume", f"--max_iters={iter_num + 5}"], env, base)
    assert resumed.returncode == 0, resumed.stderr
    assert f"taking over the stale lock {out / 'train.lock'} of PID {first.pid}" in resumed.stderr
    assert "that process is no longer running" in resumed.stderr
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == iter_num + 5
    assert not (out / "train.lock").exists()

    sample = ["--prompt=café ", "--max_new_tokens=30", "--seed=7"]
    from_checkpoint = run(script("sample.py", f"--out_dir={out}", *sample), env, base)
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr
    assert from_checkpoint.stdout.startswith("café ")

    exported = run(script("export.py", f"--out_dir={out}", "--format=hf", f"--dest={hf}"), env, base)
    assert exported.returncode == 0, exported.stderr
    assert (hf / "model.safetensors").is_file()
    from_export = run(script("sample.py", f"--init_from={hf}", *sample), env, base)  # checks memory first
    assert from_export.returncode == 0, from_export.stderr
    assert from_export.stdout == from_checkpoint.stdout


# ---------------------------------------------------------------------------- the lock, both paths

HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import runlock
lock = runlock.FolderLock(sys.argv[2], "the folder", "choose another").acquire()
print("held", "soft" if lock.soft else "os", flush=True)
time.sleep(120)
"""

CONTENDER = """
import sys
sys.path.insert(0, sys.argv[1])
import runlock
from errors import UserError
lock = runlock.FolderLock(sys.argv[2], "the folder", "choose another")
try:
    lock.acquire()
except UserError as e:
    print("refused:", e)
    sys.exit(0)
print("took", "soft" if lock.soft else "os", open(sys.argv[2], encoding="utf-8").read().strip())
lock.release()
"""

LOCKS = {"normal": "os", "windows_like": "soft"}  # the lock each path takes: without fcntl, a soft one


@pytest.fixture(params=list(LOCKS))
def lock_env(request, sim_dir):
    """(kind, environment) of the two code paths."""
    return request.param, environment(request.param, sim_dir)


@pytest.fixture
def holders():
    """start(path, env) -> a process holding the lock at path; all killed at the end."""
    procs = []

    def start(path, env):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), str(path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], 60)  # bounded: a hung holder fails the test
        assert ready, "the lock holder did not start"
        return proc, proc.stdout.readline().split()

    yield start
    for proc in procs:
        proc.kill()
        proc.communicate(timeout=30)


def contend(path, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CONTENDER, str(ROOT), str(path)], env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_lock_refuses_a_second_holder_and_names_the_first(lock_env, holders, tmp_path):
    kind, env = lock_env
    path = tmp_path / "train.lock"
    holder, said = holders(path, env)
    assert said == ["held", LOCKS[kind]]
    out = contend(path, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"refused: the folder is in use by PID {holder.pid} on host {socket.gethostname()}")
    assert "-c" in out.stdout and f"kill {holder.pid}" in out.stdout  # its command, and how to stop it
    assert json.loads(path.read_text(encoding="utf-8"))["pid"] == holder.pid  # the holder's note is untouched


def test_the_lock_of_a_killed_holder_is_taken_over(lock_env, holders, tmp_path):
    kind, env = lock_env
    path = tmp_path / "train.lock"
    holder, _ = holders(path, env)
    holder.send_signal(signal.SIGKILL)  # no chance to clean up: the note and the lock file stay
    holder.wait(timeout=30)
    assert path.exists() and (tmp_path / ".train.lock.flock").exists()
    out = contend(path, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"took {LOCKS[kind]} ")
    assert json.loads(out.stdout.split(" ", 2)[2])["pid"] != holder.pid  # the note now names the new holder
    assert f"taking over the stale lock {path} of PID {holder.pid}" in out.stderr
    assert "that process is no longer running" in out.stderr
    assert not path.exists() and not (tmp_path / ".train.lock.flock").exists()  # released at the end


def test_a_soft_lock_from_another_host_is_refused_with_the_way_out(sim_dir, tmp_path):
    """Without OS locks, a lock file whose note comes from another host cannot be checked: the
    error says which file to delete once that run is known to be over."""
    note, lock_file = tmp_path / "train.lock", tmp_path / ".train.lock.flock"
    note.write_text(json.dumps({"pid": 4242, "host": "elsewhere.example", "started": time.time(),
                                "command": "python train.py"}), encoding="utf-8")
    lock_file.touch()
    out = contend(note, environment("windows_like", sim_dir))
    assert out.stdout.startswith("refused: the folder is in use by PID 4242 on host elsewhere.example"), out
    assert f"delete {lock_file}" in out.stdout
    assert lock_file.exists() and json.loads(note.read_text(encoding="utf-8"))["pid"] == 4242


def test_a_reused_pid_is_not_the_holder(tmp_path):
    """A note's PID names its holder only if that process started before the note was written."""
    host = socket.gethostname()
    assert runlock.pid_alive(os.getpid(), since=time.time())
    assert not runlock.pid_alive(os.getpid(), since=psutil.Process().create_time() - 3600)  # a later process
    assert not runlock.holder_is_gone({"host": host, "pid": os.getpid(), "started": time.time()})
    assert runlock.holder_is_gone({"host": host, "pid": os.getpid(), "started": 0})
    assert not runlock.holder_is_gone({"host": "elsewhere.example", "pid": 1 << 30, "started": 0})


# ---------------------------------------------------------------------------- atomic writes, devices

def test_replace_waits_for_a_reader_to_let_go(tmp_path, monkeypatch):
    """On Windows os.replace fails while another process has the target open; durable.replace
    tries again, and the file is whole either way."""
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    refusals, real_replace = [], os.replace

    def busy_twice(src, dst):
        if len(refusals) < 2:
            refusals.append(dst)
            raise PermissionError(13, "The process cannot access the file because it is being used")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", busy_twice)
    monkeypatch.setattr(durable, "REPLACE_WAIT", 0.01)
    with durable.replacing(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and len(refusals) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


def test_a_durable_write_syncs_the_file_then_renames_then_syncs_the_folder(tmp_path, monkeypatch):
    """The order that makes a write survive a crash or a power cut: the new contents reach the disk
    (fsync of the temporary file) before the rename puts them under the file's name, and the
    rename reaches it (fsync of the folder, where the OS can open one) before the write returns."""
    import stat
    target = tmp_path / "metrics.jsonl"
    target.write_text("old")
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", "folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(src).parent, Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    durable.write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    expected = [("fsync", "file", target.stat().st_ino),  # the temporary file, now under the name
                ("replace", tmp_path, target)]
    if os.name != "nt":  # Windows cannot open a folder to fsync it (durable.fsync_folder)
        expected.append(("fsync", "folder", tmp_path.stat().st_ino))
    assert events == expected
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left



def test_a_target_that_stays_busy_fails_after_every_try_and_keeps_the_old_file(tmp_path, monkeypatch):
    """A reader that never lets go: REPLACE_TRIES attempts with a wait between each, then the
    PermissionError; the old file is whole and no temporary file is left."""
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    tries, waits = [], []

    def always_busy(src, dst):
        tries.append(dst)
        raise PermissionError(13, "The process cannot access the file because it is being used")

    monkeypatch.setattr(os, "replace", always_busy)
    monkeypatch.setattr(durable.time, "sleep", waits.append)
    with pytest.raises(PermissionError), durable.replacing(target) as f:
        f.write(b"new")
    assert len(tries) == durable.REPLACE_TRIES and waits == [durable.REPLACE_WAIT] * (durable.REPLACE_TRIES - 1)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.parametrize("refusal", [PermissionError, IsADirectoryError])
def test_a_folder_the_os_will_not_open_is_not_synced_and_the_write_succeeds(tmp_path, monkeypatch, refusal):
    real_open = os.open

    def no_folders(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise refusal(13, "a folder is not something this OS opens", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_folders)
    durable.write_text(tmp_path / "notes.txt", "kept")
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "kept"


def test_a_filesystem_that_cannot_sync_folders_still_writes_and_a_real_error_is_raised(tmp_path, monkeypatch):
    """Some filesystems answer a folder's fsync with EINVAL (or EBADF, EACCES, ENOTSUP): that is
    no failure; an I/O error is. Either way the folder's descriptor is closed."""
    import errno
    import stat
    real_fsync, real_close, failure = os.fsync, os.close, [errno.EINVAL]
    opened, closed = [], []

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            opened.append(fd)
            raise OSError(failure[0], os.strerror(failure[0]))
        real_fsync(fd)

    def close(fd):
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "close", close)
    durable.write_text(tmp_path / "notes.txt", "kept")
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "kept"
    failure[0] = errno.EIO
    with pytest.raises(OSError) as e:
        durable.fsync_folder(tmp_path)
    assert e.value.errno == errno.EIO
    assert len(opened) == 2 and all(fd in closed for fd in opened)


def test_stale_temporary_files_of_the_same_target_go_and_others_stay(tmp_path):
    """A process killed mid-write leaves .<name>.tmp-<pid>: the next write of that name removes
    it; another file's temporary file (a write of it may be under way) is not touched."""
    (tmp_path / ".ckpt.pt.tmp-999999").write_bytes(b"half")
    (tmp_path / ".metrics.jsonl.tmp-999999").write_bytes(b"someone else's")
    durable.write_text(tmp_path / "ckpt.pt", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".metrics.jsonl.tmp-999999", "ckpt.pt"]


def test_ctrl_c_inside_a_durable_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), durable.replacing(target) as f:
        f.write(b"part of the new")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_file_in_the_way_names_the_file_where_a_folder_should_be(tmp_path):
    (tmp_path / "blocker").write_text("a file")
    assert durable.file_in_the_way(tmp_path / "blocker" / "sub" / "out.json") == tmp_path / "blocker"
    assert durable.file_in_the_way(tmp_path / "new" / "sub" / "out.json") is None  # folders can be made
    assert durable.file_in_the_way(tmp_path / "out.json") is None


def test_mps_precision_follows_the_macos_version():
    assert hardware.mps_dtype("14.5")[0] == "bfloat16"
    assert hardware.mps_dtype("15.0")[0] == "bfloat16"
    dtype, why = hardware.mps_dtype("13.6.1")
    assert dtype == "float32" and "macOS 14" in why
    assert hardware.mps_dtype("")[0] == "float32"  # not macOS, or unknown


def test_memory_check_needs_no_posix():
    have = hardware.available_memory()
    assert 0 < have <= psutil.virtual_memory().total


@pytest.mark.parametrize("script", ["train.py", "sample.py", "eval.py", "export.py", "app.py", "bench.py", "plot.py", "prepare.py",
                                    "bench_prepare.py"])
def test_a_python_without_the_requirements_gets_one_line(script):
    """`python -S` leaves site-packages out, as a Python where `pip install -r requirements.txt`
    never ran: one line naming what is missing and the command, exit 2, no import traceback."""
    r = subprocess.run([sys.executable, "-S", script, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines() == [r.stderr.strip()] and "torch" in r.stderr
    assert r.stderr.strip().endswith("pip install -r requirements.txt")


def test_ctrl_c_while_torch_imports_is_one_line(tiny_data, tmp_path):
    """Ctrl-C a moment after start, while torch imports (or, on a fast machine, just after):
    exit 130 and no traceback."""
    process = subprocess.Popen([sys.executable, "train.py", f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}",
                                *TINY, "--max_iters=100000"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err


def test_stale_temporary_files_are_found_for_names_with_glob_characters(tmp_path):
    """`plot.py --output='loss[1].png'`: a temporary file a killed write left is removed by the
    next write of that name, and a name holding `*` removes no other file's temporary file."""
    import durable
    (tmp_path / ".loss[1].png.tmp-4242").write_text("half", encoding="utf-8")
    (tmp_path / ".other.png.tmp-4242").write_text("another write's", encoding="utf-8")
    durable.write_text(tmp_path / "loss[1].png", "x")
    durable.write_text(tmp_path / "*", "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["*", ".other.png.tmp-4242", "loss[1].png"]
