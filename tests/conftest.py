"""Shared test setup: offline copies of the corpus and the tiktoken files, CPU only."""
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

# These machines have no internet: point tiktoken at the shared cache when it is there.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")
os.environ.setdefault("WANDB_MODE", "offline")
# Test models are tiny: one thread each is fastest, and spinning OpenMP threads of parallel
# test processes would otherwise fight over the cores. (Subprocesses inherit this.)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# No test downloads anything from the Hugging Face Hub (transformers reads these at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# transformers copies the modeling code of a trust_remote_code folder into this cache: keep it
# out of ~, in a folder of this test process that goes when the process ends
if "HF_MODULES_CACHE" not in os.environ:
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="hf-modules-")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """The tiny Shakespeare corpus (1,115,394 characters)."""
    path = SHARED / "data" / "tinyshakespeare" / "input.txt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path.read_text(encoding="utf-8")


def write_char_dataset(data_dir: Path, text: str, name: str = "tiny", val_fraction: float = 0.1) -> Path:
    """A char-level dataset in the prepared-data format (docs/design.md, contract 1), built
    directly so the training tests do not depend on prepare.py."""
    import json

    import numpy as np
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.uint16)
    n = int(len(ids) * (1 - val_fraction))
    folder = Path(data_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    ids[:n].tofile(folder / "train.bin")
    ids[n:].tofile(folder / "val.bin")
    meta = {"version": 1, "tokenizer": "char", "vocab_size": len(chars), "dtype": "uint16",
            "train_tokens": n, "val_tokens": len(ids) - n, "eot_id": None, "chars": chars,
            "sources": []}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def write_token_dataset(data_dir: Path, name: str, train, val, **meta) -> Path:
    """A dataset of the given token ids (train and val), in the prepared-data format; meta adds
    to (or replaces) meta.json's keys, e.g. documents="line", eot_id=0 for document mode."""
    import json

    import numpy as np
    folder = Path(data_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": np.asarray(train, dtype=np.uint16), "val": np.asarray(val, dtype=np.uint16)}
    for split, ids in splits.items():
        ids.tofile(folder / f"{split}.bin")
    vocab_size = int(max(ids.max() for ids in splits.values())) + 1
    (folder / "meta.json").write_text(json.dumps({
        "version": 1, "tokenizer": "char", "vocab_size": vocab_size, "dtype": "uint16",
        "train_tokens": len(splits["train"]), "val_tokens": len(splits["val"]), "eot_id": None,
        "chars": [chr(ord("a") + i) for i in range(vocab_size)], "sources": [], **meta}))
    return folder


@pytest.fixture
def tiny_data(tmp_path, shakespeare_text):
    """data_dir holding dataset 'tiny': the first 60k characters of Shakespeare."""
    write_char_dataset(tmp_path / "data", shakespeare_text[:60_000])
    return tmp_path / "data"


# A model small enough that a training step takes milliseconds.
TINY = ["--dataset=tiny", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2",
        "--dtype=float32", "--device=cpu"]


def torchrun(log_dir, *args, nproc: int = 2) -> list[str]:
    """`torchrun --standalone` with nproc CPU processes (gloo). Each rank's stdout and stderr go
    to files under log_dir, which rank_output() reads back for failure messages."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--log-dir={log_dir}", "--redirects=3", *args]


def rank_output(log_dir, tail: int = 3000) -> str:
    """The end of every rank's stdout and stderr under log_dir, one block per file."""
    blocks = [f"--- {path.relative_to(log_dir)} ---\n{path.read_text(errors='replace')[-tail:]}"
              for path in sorted(Path(log_dir).rglob("std*.log"))]
    return "\n".join(blocks) or f"(no rank output under {log_dir})"


# A test process that dies of a signal (a rank's SIGABRT, say) prints every thread's Python
# stack on its stderr, which rank_output() then shows.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(flags, log):
    """Start app.py with flags on a free port, yield its URL once it answers, stop it after."""
    port = free_port()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *flags, f"--port={port}", "--device=cpu"],
                                cwd=ROOT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONIOENCODING": "utf-8"},
                                stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"app.py exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"app.py did not start in 120 s:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def ctrl_c_at_check(n: int):
    """A train.StopRequest.requested that answers as a Ctrl-C would at the loop's n-th check
    (0: the first, before any step), for patching in: where a real signal lands is chance."""
    import signal
    checks = iter(range(10 ** 9))

    def requested(self, ddp, device):
        if next(checks) == n:
            self.signum = signal.SIGINT
            return True
        return False
    return requested
