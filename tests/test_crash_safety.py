"""Nothing lost: kills, signals, NaNs, bad checkpoints and full disks never cost a user their run."""
import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import train
from conftest import TINY, write_char_dataset
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def train_cmd(data_dir, out_dir, *flags):
    return [sys.executable, str(ROOT / "train.py"), f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *flags]


def run_train(data_dir, out_dir, *flags):
    train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *flags])


def weights_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# A process that imports torch and train.py once, then forks a fresh training run for each
# line of arguments it reads and prints the child's pid: each run starts in milliseconds
# instead of seconds. It never computes anything itself, so forking it is safe.
FORK_SERVER = """
import os, sys, json
sys.path.insert(0, sys.argv[1])
import torch._dynamo  # torch.optim imports it on first use, which takes seconds
import train
from errors import run_main
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        sys.stdin.close()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        try:
            run_main(train.main, json.loads(line))
        finally:
            os._exit(0)
    print(pid, flush=True)
"""


def test_kill9_at_random_moments_never_loses_the_checkpoint(tiny_data, tmp_path):
    """20+ SIGKILLs, some while a checkpoint is being written: after each one the checkpoint
    loads with weights_only=True and its iteration never goes backwards; then the run finishes."""
    import json
    out = tmp_path / "out"
    ckpt_path = out / "ckpt.pt"
    # a checkpoint at every iteration, of a model big enough that writing one takes a while
    flags = [f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, "--n_layer=4", "--n_embd=128",
             "--eval_interval=1", "--eval_iters=1", "--max_iters=400", "--lr_decay_iters=400"]
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER, str(ROOT)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(400, server.kill)  # a hung server ends readline() below with ''
    watchdog.start()
    rng = random.Random(0)
    last_iter, kills, mid_write = -1, 0, 0
    deadline = time.monotonic() + 300  # bounded whatever the machine's speed (24 kills took 33 s quiet)
    try:
        while kills < 24 and time.monotonic() < deadline:
            resume = ["--init_from=resume"] if ckpt_path.exists() else []
            start_mtime = ckpt_path.stat().st_mtime_ns if ckpt_path.exists() else 0
            server.stdin.write(json.dumps(flags + resume) + "\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            # wait until this run has written a checkpoint of its own
            t_end = time.monotonic() + 30
            while time.monotonic() < t_end:
                if ckpt_path.exists() and ckpt_path.stat().st_mtime_ns != start_mtime:
                    break
                time.sleep(0.002)
            if kills % 2 == 0:  # half the kills land while a temporary checkpoint file is open
                t_end = time.monotonic() + 5
                while time.monotonic() < t_end and not list(out.glob(".ckpt.pt.tmp-*")):
                    time.sleep(0.0002)
            else:
                time.sleep(rng.uniform(0, 0.3))
            os.kill(pid, signal.SIGKILL)
            while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
                time.sleep(0.001)  # dead once it is a zombie
            kills += 1
            mid_write += bool(list(out.glob(".ckpt.pt.tmp-*")))
            ckpt = torch.load(ckpt_path, weights_only=True)  # the plain, safe loader opens it
            assert checkpoint.load(ckpt_path)["iter_num"] == ckpt["iter_num"] >= last_iter
            assert ckpt["iter_num"] < 400, "the run ended before it was killed"
            last_iter = ckpt["iter_num"]
    finally:
        watchdog.cancel()
        server.stdin.close()
        server.wait(timeout=30)
    assert kills >= 20, f"only {kills} kills fitted in the time bound"
    assert mid_write >= 3, f"only {mid_write} kills hit a checkpoint being written"
    # and the run still finishes from where it was
    run_train(tiny_data, out, *flags[2 + len(TINY):], "--init_from=resume", "--eval_interval=1000")
    assert checkpoint.load(ckpt_path)["iter_num"] == 400
    assert not list(out.glob(".ckpt.pt.tmp-*"))  # stale temporary files were cleaned up


SIGNAL_RUN = ["--max_iters=200", "--eval_interval=1000", "--lr_decay_iters=200", "--dropout=0.1",
              "--gradient_accumulation_steps=2"]


@pytest.fixture(scope="module")
def uninterrupted_signal_run(tmp_path_factory, shakespeare_text):
    """(data_dir, the checkpoint of SIGNAL_RUN run to its end), made once for both signals."""
    root = tmp_path_factory.mktemp("signal")
    write_char_dataset(root / "data", shakespeare_text[:60_000])
    run_train(root / "data", root / "full", *SIGNAL_RUN)
    return root / "data", checkpoint.load(root / "full" / "ckpt.pt")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_resume_is_exact(uninterrupted_signal_run, tmp_path, sig):
    tiny_data, full = uninterrupted_signal_run
    out = tmp_path / "stopped"
    proc = subprocess.Popen(train_cmd(tiny_data, out, *SIGNAL_RUN), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        t_end = time.monotonic() + 300  # a loaded machine can take a minute to import torch
        while time.monotonic() < t_end and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") > 10:
                break
            time.sleep(0.01)
        assert proc.poll() is None and metrics.exists() and metrics.read_text().count("\n") > 10, "no progress"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert "Resume with" in err and "--init_from=resume" in err and "Traceback" not in err
    assert not (out / "train.lock").exists()  # the lock went with the run
    stopped_at = checkpoint.load(out / "ckpt.pt")["iter_num"]
    assert 0 < stopped_at < 200
    run_train(tiny_data, out, "--init_from=resume")
    resumed = checkpoint.load(out / "ckpt.pt")
    assert resumed["iter_num"] == 200
    assert weights_equal(full["model"], resumed["model"])


def test_a_stop_during_a_long_evaluation_is_said_at_once_and_drops_it(tiny_data, tmp_path):
    """Ctrl-C while a large model evaluates (minutes on a CPU): one line at once, the evaluation
    is dropped, the step saved, and the run leaves (it used to finish the evaluation first, silent)."""
    out = tmp_path / "out"
    proc = subprocess.Popen(train_cmd(tiny_data, out, "--max_iters=40", "--eval_interval=20", "--log_interval=1",
                                      "--eval_at_start=False", "--eval_iters=10000000"),  # the one at 20: hours
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        t_end = time.monotonic() + 300
        while time.monotonic() < t_end and proc.poll() is None:  # step 19 logged: evaluating 20 now
            if metrics.exists() and '"iter": 19,' in metrics.read_text():
                break
            time.sleep(0.01)
        time.sleep(0.5)
        assert proc.poll() is None, "the run ended before its evaluation"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert ("Ctrl-C: stopping at the end of this step, with a checkpoint to resume from; Ctrl-C again stops at "
            "once, unsaved") in err
    assert f"SIGINT received: saved iteration 20 to {out / 'ckpt.pt'}" in err and "Traceback" not in err, err
    saved = checkpoint.load(out / "ckpt.pt")
    assert saved["iter_num"] == 20 and saved["eval_owed"]
    # the resumed run makes the evaluation the stop dropped (it took the checkpoint's word that it was made)
    run_train(tiny_data, out, "--init_from=resume", "--eval_iters=2")
    evals = [r["iter"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val/loss" in r]
    assert evals == [20, 40]
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 40


def test_a_reader_that_leaves_stdout_does_not_end_the_training(tiny_data, tmp_path):
    """`python train.py ... | head -1`: the pipe closes after one line; the run trains to the end
    (its lines dropped, one note on stderr) instead of stopping at the next print."""
    out = tmp_path / "out"
    proc = subprocess.Popen(train_cmd(tiny_data, out, "--max_iters=30", "--eval_interval=15", "--log_interval=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        proc.stdout.close()  # the reader leaves
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "standard output was closed" in err and "Traceback" not in err and "Exception ignored" not in err
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 30


@pytest.mark.parametrize("pipe", ["| head -1", "2>&1 | head -1"])
def test_train_and_prepare_go_on_when_the_reader_of_their_output_leaves(tiny_data, tmp_path, pipe):
    """Through a real shell pipe, with Python's output buffered as it is by default: `| head -1`
    (stdout) and `2>&1 | head -1` (stderr too) leave the run and the dataset whole, exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    out = tmp_path / "out"
    runs = {
        "train": " ".join(f'"{a}"' for a in train_cmd(tiny_data, out, "--max_iters=30", "--eval_interval=15",
                                                     "--log_interval=1")),
        "prepare": f'"{sys.executable}" "{ROOT / "prepare.py"}" --input "{tiny_data / "tiny" / "input.txt"}" '
                   f'--name p --tokenizer char --data_dir "{tmp_path / "data"}" --block_size 8',
    }
    (tiny_data / "tiny" / "input.txt").write_text("to be or not to be\n" * 200, encoding="utf-8")
    for name, cmd in runs.items():
        done = subprocess.run(["bash", "-c", f'{cmd} {pipe} > /dev/null; exit "${{PIPESTATUS[0]}}"'],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (name, done.stderr)
        assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, (name, done.stderr)
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 30
    assert (tmp_path / "data" / "p" / "meta.json").is_file()


def poison_training_forward(monkeypatch, at_call):
    """Make the loss NaN on the at_call-th training forward pass (eval passes not counted)."""
    forward = train.GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, kv_cache=None, positions=None):
        logits, loss = forward(self, idx, targets, kv_cache, positions)
        if self.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(train.GPT, "forward", poisoned)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    poison_training_forward(monkeypatch, at_call=8)  # iteration 7
    with pytest.raises(UserError, match="non-finite .* at iteration 7"):
        run_train(tiny_data, tmp_path / "out", "--max_iters=20", "--eval_interval=5")
    ckpt = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] == 5
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_nonfinite_loss_under_float16_skips_the_step(tiny_data, tmp_path, monkeypatch, capsys):
    poison_training_forward(monkeypatch, at_call=4)
    run_train(tiny_data, tmp_path / "out", "--max_iters=10", "--eval_interval=5", "--dtype=float16")
    assert "iteration 3: gradients overflowed in float16, step skipped" in capsys.readouterr().out
    ckpt = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] == 10
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_never_saves_nan_weights(tiny_data, tmp_path, monkeypatch):
    """Weights gone non-finite in a step whose own loss was finite (so the non-finite-loss check
    of the next step never comes) are never saved over the last good checkpoint: the save at
    the evaluation after that step refuses, with one line."""
    run_train(tiny_data, tmp_path / "out", "--max_iters=5", "--eval_interval=5")
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    step, steps = train.train_step, []

    def poisoning_step(model, *args, **kwargs):
        result = step(model, *args, **kwargs)
        steps.append(result)
        if len(steps) == 5:  # the step of iteration 9: then iteration 10 evaluates and saves
            with torch.no_grad():
                model.transformer.ln_f.weight.fill_(float("nan"))
        return result

    monkeypatch.setattr(train, "train_step", poisoning_step)
    with pytest.raises(UserError, match="the model holds NaN or inf at iteration 10; not saving it"):
        run_train(tiny_data, tmp_path / "out", "--max_iters=10", "--eval_interval=5", "--init_from=resume",
                  "--always_save_checkpoint=true")
    assert len(steps) == 5 and all(torch.isfinite(loss) for loss, _ in steps)
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before


class RunsCode:
    """A pickle that would run a command when unpickled unsafely."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_checkpoints_are_refused_without_running_anything(tmp_path):
    good = tmp_path / "good.pt"
    checkpoint.save({"model": {"w": torch.ones(3)}, "model_args": {}, "iter_num": 1, "config": {},
                     "tokenizer": {}}, good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"a": 1}, tmp_path / "foreign.pt")
    marker = tmp_path / "pwned"
    torch.save({"format": checkpoint.FORMAT, "payload": RunsCode(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil_pickle.pt", "wb") as f:
        pickle.dump(RunsCode(marker), f)
    expected = {"truncated": "truncated or corrupted", "garbage": "truncated or corrupted",
                "empty": "truncated or corrupted", "foreign": "not a checkpoint of this project",
                "evil": "not plain data", "evil_pickle": "not plain data|truncated or corrupted"}
    for name, message in expected.items():
        with pytest.raises(UserError, match=message):
            checkpoint.load(tmp_path / f"{name}.pt")
    assert not marker.exists()
    assert checkpoint.load(good)["iter_num"] == 1


def test_bytes_changed_inside_a_tensor_are_refused_by_their_checksum(tmp_path):
    """A NaN written over weights (a bit flip on disk, an edit) leaves a file torch.load reads
    without a word; the zip's CRC-32 of that part tells, and the load says which part."""
    good = tmp_path / "good.pt"
    checkpoint.save({"model": {"w": torch.ones(4096)}, "model_args": {}, "iter_num": 1, "config": {},
                     "tokenizer": {}}, good)
    data = bytearray(good.read_bytes())
    at = bytes(data).index(torch.ones(4096).numpy().tobytes()) + 400  # inside the tensor's bytes
    data[at:at + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    assert torch.isnan(torch.load(bad, weights_only=True)["model"]["w"]).any()  # torch alone takes it
    with pytest.raises(UserError, match=r"bad.pt is corrupted: its part .*/data/0 fails its checksum"):
        checkpoint.load(bad)


def test_random_bytes_are_refused_in_one_line(tmp_path):
    """Random bytes reach many corners of the unpickler (IndexError, KeyError, struct.error
    once escaped as tracebacks); every one must end as a clear error."""
    rng = random.Random(0)
    path = tmp_path / "ckpt.pt"
    for _ in range(300):
        path.write_bytes(rng.randbytes(rng.choice([1, 2, 16, 100, 4096])))
        with pytest.raises(UserError, match="truncated or corrupted|not plain data"):
            checkpoint.load(path)


def test_sigterm_while_starting_releases_the_lock_and_leaves_no_new_folder(tiny_data, tmp_path, monkeypatch, capsys):
    """SIGTERM before the loop's stop request is in place (here: while the model is built) ends
    the run as Ctrl-C does: one line, exit 143, the lock released and the new out_dir removed."""
    from errors import run_main
    out = tmp_path / "out"
    build = train.build_model

    def build_then_sigterm(*args, **kwargs):
        model = build(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, in this thread
        return model

    monkeypatch.setattr(train, "build_model", build_then_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            run_main(train.main, [f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, "--max_iters=2"])
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.code == 143 and capsys.readouterr().err.strip().endswith("terminated")
    assert not out.exists()  # created by this run, empty again: removed, lock and all
    assert after is previous  # the caller's handler is back


def test_sigterm_while_a_checkpoint_loads_is_not_taken_for_damage(tiny_data, tmp_path, monkeypatch, capsys):
    """SIGTERM while a resume reads its checkpoint ends the run as "terminated" (143): never as
    "truncated or corrupted", which could make a user delete a good checkpoint."""
    from errors import run_main
    out = tmp_path / "out"
    run_train(tiny_data, out, "--max_iters=2", "--eval_interval=2")
    real_load = torch.load

    def load_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # lands inside checkpoint.read's try
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", load_then_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            run_main(train.main, [f"--data_dir={tiny_data}", f"--out_dir={out}", "--init_from=resume", "--max_iters=4"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.code == 143 and capsys.readouterr().err.strip().endswith("terminated")


def test_a_checkpoint_saved_without_checksums_loads(tmp_path):
    """torch.save can skip the CRC-32s (its compute_crc32 option records 0): nothing to check, not damage."""
    from torch.utils.serialization import config
    monkey = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        checkpoint.save({"model": {"w": torch.ones(4096)}, "model_args": {}, "iter_num": 3, "config": {},
                         "tokenizer": {}}, tmp_path / "ckpt.pt")
    finally:
        config.save.compute_crc32 = monkey
    assert checkpoint.load(tmp_path)["iter_num"] == 3


def test_unwritable_out_dir_is_a_clear_error(tiny_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot create --out_dir"):
        run_train(tiny_data, blocker / "out", "--max_iters=2", "--eval_interval=1")


def test_full_disk_during_save_keeps_the_previous_checkpoint(tiny_data, tmp_path, monkeypatch):
    run_train(tiny_data, tmp_path / "out", "--max_iters=5", "--eval_interval=5")
    path = tmp_path / "out" / "ckpt.pt"
    before = path.read_bytes()

    def save_until_disk_is_full(obj, f):
        f.write(b"\0" * 1000)  # part of the file lands, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", save_until_disk_is_full)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is unchanged"):
        run_train(tiny_data, tmp_path / "out", "--max_iters=10", "--eval_interval=5", "--init_from=resume")
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".ckpt.pt.tmp-*"))


def test_bytes_changed_past_the_first_mebibyte_are_refused_too(tmp_path):
    """The checksum covers every byte of a part, not just the start: a NaN written near the end
    of a 4 MB tensor is found."""
    good = tmp_path / "good.pt"
    checkpoint.save({"model": {"w": torch.ones(1 << 20)}, "model_args": {}, "iter_num": 1, "config": {},
                     "tokenizer": {}}, good)
    data = bytearray(good.read_bytes())
    at = bytes(data).index(torch.ones(1024).numpy().tobytes()) + (4 << 20) - 400  # near the tensor's end
    data[at:at + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    assert torch.isnan(torch.load(bad, weights_only=True)["model"]["w"][-200:]).any()
    with pytest.raises(UserError, match=r"bad.pt is corrupted: its part .*/data/0 fails its checksum"):
        checkpoint.load(bad)
