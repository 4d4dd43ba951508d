"""train.py under torchrun (two CPU processes, gloo): Ctrl-C stops every rank at the same step,
rank 0 saves, and the resume is exact; only rank 0 holds the lock on out_dir."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import train
from conftest import TINY, rank_output, torchrun
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def environ_of(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


def training_lines(metrics: Path) -> int:
    return metrics.read_text().count('"tokens_per_sec"') if metrics.exists() else 0


def test_ctrl_c_stops_every_rank_at_one_step_and_the_resume_is_exact(tiny_data, tmp_path):
    """Ctrl-C at a terminal reaches torchrun and both ranks (and torchrun forwards it again):
    both ranks stop at the same step, rank 0 saves, and resuming under torchrun ends
    bit-identical to an uninterrupted torchrun run, dropout and gradient accumulation included."""
    common = [str(ROOT / "train.py"), f"--data_dir={tiny_data}", *TINY, "--eval_interval=1000",
              "--lr_decay_iters=1000", "--dropout=0.1", "--gradient_accumulation_steps=4"]
    out = tmp_path / "stopped"
    job = subprocess.Popen(torchrun(tmp_path / "logs1", *common, f"--out_dir={out}", "--max_iters=1000"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # its own process group, as a terminal job has
    try:
        t_end = time.monotonic() + 300  # a loaded machine can take minutes to start three processes
        while time.monotonic() < t_end and job.poll() is None and training_lines(out / "metrics.jsonl") < 3:
            time.sleep(0.01)
        assert job.poll() is None, job.communicate()[0][-2000:] + rank_output(tmp_path / "logs1")
        # while it runs: rank 0, and only it, holds the lock, and a second run is refused
        holder = json.loads((out / "train.lock").read_text())["pid"]
        assert environ_of(holder).get("RANK") == "0"
        with pytest.raises(UserError, match=f"in use by PID {holder} "):
            train.main([f"--out_dir={out}", f"--data_dir={tiny_data}", *TINY, "--max_iters=5"])
        os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C does
        log = job.communicate(timeout=120)[0]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate(timeout=30)
    ranks = rank_output(tmp_path / "logs1")
    rank_files = sorted((tmp_path / "logs1").rglob("stderr.log"))
    assert len(rank_files) == 2, log[-2000:] + ranks
    assert (out / "ckpt.pt").exists(), "no checkpoint after Ctrl-C\n" + log[-2000:] + ranks
    stopped_at = checkpoint.load(out / "ckpt.pt")["iter_num"]
    assert f"SIGINT received: saved iteration {stopped_at}" in rank_files[0].read_text(), log[-2000:] + ranks
    assert "Traceback" not in ranks and "Fatal Python error" not in ranks and "exitcode: -" not in log, \
        log[-2000:] + ranks
    assert 0 < stopped_at < 1000
    assert not (out / "train.lock").exists()  # released on the way out

    end = f"--max_iters={stopped_at + 3}"
    resume = subprocess.run(torchrun(tmp_path / "logs2", str(ROOT / "train.py"), f"--out_dir={out}",
                                     f"--data_dir={tiny_data}", "--init_from=resume", end),
                            capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr[-2000:] + rank_output(tmp_path / "logs2")
    full = subprocess.run(torchrun(tmp_path / "logs3", *common, f"--out_dir={tmp_path / 'full'}", end),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:] + rank_output(tmp_path / "logs3")

    expected = checkpoint.load(tmp_path / "full" / "ckpt.pt")
    resumed = checkpoint.load(out / "ckpt.pt")
    assert resumed["iter_num"] == expected["iter_num"] == stopped_at + 3
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert resumed["best_val_loss"] == expected["best_val_loss"]
    assert len(resumed["rng"]["data"]) == len(resumed["rng"]["torch_ranks"]) == 2  # one of each per rank
    assert resumed["config"]["gradient_accumulation_steps"] == 4  # saved as the global setting
    assert resumed["config"]["optimizer"] == "adamw" and "muon" not in resumed["optimizer"]


def test_a_signal_that_lands_during_the_agreement_is_kept_for_the_next_step(tmp_path, monkeypatch):
    """A rank waits in the stop agreement's all-reduce for the others, so a Ctrl-C often lands
    there, and its handler runs as the all-reduce returns. That signal missed this step's
    agreement; it must count at the next one (it once was overwritten, every rank lost both
    copies of the Ctrl-C, and torchrun killed the run 30 s later without a checkpoint)."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    stop = train.StopRequest(ddp=True)
    try:
        all_reduce = torch.distributed.all_reduce

        def signal_during(tensor, op):
            work = all_reduce(tensor, op=op)
            stop._handle(signal.SIGINT, None)  # what the handler does as the call returns
            return work

        monkeypatch.setattr(torch.distributed, "all_reduce", signal_during)
        assert not stop.requested(True, "cpu")  # this step's agreement was already under way
        monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
        assert stop.requested(True, "cpu") and stop.signum == signal.SIGINT  # the next step stops
    finally:
        stop.restore()
        torch.distributed.destroy_process_group()


def test_device_cpu_keeps_torchrun_ranks_off_the_gpus(monkeypatch, tmp_path, capsys):
    """On a machine with GPUs, `torchrun ... --device=cpu` trains on the CPU with gloo (each
    rank was moved to cuda:<local rank>, one that may not exist); without --device=cpu, GPUs."""
    import torch
    import train
    from training import TrainConfig
    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as torchrun would see it
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(("backend", backend)))
    cfg = TrainConfig(device="cpu")
    train.start_process_group(cfg)
    assert calls == [("backend", "gloo")] and cfg.device == "cpu"
    calls.clear()
    cfg = TrainConfig(device="auto")
    train.start_process_group(cfg)
    assert calls == [("backend", "nccl"), ("set_device", "cuda:1")] and cfg.device == "cuda:1"
    # a resume that passes no --device takes the checkpoint's, before choosing the backend
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"config": {"device": "cpu"}}, out / "ckpt.pt")
    calls.clear()
    cfg = TrainConfig(out_dir=str(out), init_from="resume")
    train.start_process_group(cfg, {"out_dir", "init_from"})
    assert calls == [("backend", "gloo")] and cfg.device == "cpu"
    assert train.ddp_device("cuda:0", 1, True) == "cuda:1"  # rank 0's saved device, read by rank 1
    monkeypatch.setenv("RANK", "0")  # rank 0 says what it overrides
    monkeypatch.setenv("LOCAL_RANK", "0")
    train.start_process_group(TrainConfig(device="cuda:1"), {"device"})
    train.start_process_group(TrainConfig(device="cpu", backend="nccl"), {"device", "backend"})
    out = capsys.readouterr().out
    assert "each process takes the GPU of its local rank (cuda:0 for rank 0), not --device=cuda:1" in out
    assert "note: --backend=nccl is for GPUs; these processes run on the CPU, so with gloo" in out
    with pytest.raises(UserError, match="not on MPS"):
        train.start_process_group(TrainConfig(device="mps"))
