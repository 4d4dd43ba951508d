"""train.py --time_budget (the run's length in training seconds) and --patience (early stopping)."""
import json
import re
import subprocess
import types
from pathlib import Path

import pytest

import checkpoint
import train
import training
from conftest import TINY, ctrl_c_at_check, rank_output, torchrun
from training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def run_train(data_dir, out_dir, *flags):
    train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *flags])


def read_metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_schedule_follows_progress():
    """With a budget the schedule sits at progress x lr_decay_iters: warmup and decay are fractions
    of the budget, and Muon's momentum warmup too."""
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, max_iters=10**6,
                            time_budget=55.0, muon_momentum_warmup=55)
    assert training.schedule_iter(7, 0.0, cfg) == 0.0
    assert training.schedule_iter(7, 30.0, cfg) == pytest.approx(60.0)
    assert training.schedule_iter(7, 66.0, cfg) == pytest.approx(132.0)
    assert training.get_lr(training.schedule_iter(0, 30.0, cfg), cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert training.get_lr(training.schedule_iter(0, 55.0, cfg), cfg) == pytest.approx(0.1)
    assert training.get_muon_momentum(training.schedule_iter(0, 27.5, cfg), cfg) == pytest.approx(0.95)
    assert training.get_muon_momentum(training.schedule_iter(0, 13.75, cfg), cfg) == pytest.approx(0.9)
    fixed = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, max_iters=200)
    assert training.schedule_iter(60, 25.0, fixed) == 60  # no budget: the iteration


def test_budget_run_stops_and_saves_its_time(tiny_data, tmp_path, capsys):
    run_train(tiny_data, tmp_path / "out", "--time_budget=1", "--max_iters=1000000", "--eval_interval=1000000",
              "--lr_decay_iters=100", "--log_interval=1")
    out = capsys.readouterr().out
    ckpt = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    assert 0 < ckpt["iter_num"] < 1000000 and ckpt["train_seconds"] >= 1
    assert f"time budget spent: {ckpt['iter_num']:,} iterations in " in out
    logs = [r for r in read_metrics(tmp_path / "out") if "step_ms" in r]
    progress = [r["progress"] for r in logs]
    assert progress == sorted(progress) and progress[0] == 0.0 and progress[-1] < 1.0
    cfg = TrainConfig(**ckpt["config"])
    for r in logs:  # each step's rate is the schedule's at the training time spent before it
        assert r["lr"] == pytest.approx(training.get_lr(r["progress"] * cfg.lr_decay_iters, cfg))
    assert "val/loss" in read_metrics(tmp_path / "out")[-1]  # evaluated after the budget was spent


def test_resumed_budget_run_spends_only_what_is_left(tiny_data, tmp_path, capsys):
    """A budget run cut short (here by max_iters) continues on the schedule where its time left
    it; a checkpoint whose budget is spent takes no more steps."""
    out = tmp_path / "out"
    run_train(tiny_data, out, "--time_budget=1000", "--max_iters=6", "--eval_interval=3", "--lr_decay_iters=100")
    spent = checkpoint.load(out / "ckpt.pt")["train_seconds"]
    assert spent > 0
    # the schedule follows the budget, so max_iters left it unfinished: said (it ended at a 1% warmup, silently)
    out_text = capsys.readouterr().out
    assert (f"note: --max_iters=6 ended this run after {spent:.1f} s of its --time_budget=1000 (0%); the learning "
            f"rate follows the budget, so it stood at ") in out_text
    assert "its warmup unfinished and its decay not started: give the time" in out_text  # (TINY: 2 of 100)
    # past the warmup only the decay is left; without a schedule, nothing of one is said
    run_train(tiny_data, tmp_path / "warm", "--time_budget=1000", "--max_iters=6", "--lr_decay_iters=100",
              "--warmup_iters=0")
    assert "stood at" in (text := capsys.readouterr().out) and "its decay unfinished: give the time" in text
    run_train(tiny_data, tmp_path / "wsd", "--time_budget=1000", "--max_iters=6", "--lr_decay_iters=100",
              "--warmup_iters=0", "--lr_schedule=wsd")  # still in its stable phase
    assert "its decay not started: give the time" in capsys.readouterr().out
    run_train(tiny_data, tmp_path / "flat", "--time_budget=1000", "--max_iters=6", "--decay_lr=False")
    assert "(0%); give the time the run takes, or a higher --max_iters" in capsys.readouterr().out
    run_train(tiny_data, out, "--init_from=resume", "--max_iters=9")
    resumed = [r for r in read_metrics(out) if "step_ms" in r and r["iter"] >= 6]
    assert resumed[0]["iter"] == 6 and resumed[0]["progress"] == pytest.approx(spent / 1000)
    after = checkpoint.load(out / "ckpt.pt")
    assert after["iter_num"] == 9 and after["train_seconds"] > spent
    # a budget smaller than the time already spent: nothing left, evaluate and stop
    capsys.readouterr()
    run_train(tiny_data, out, "--init_from=resume", "--max_iters=100", f"--time_budget={spent}")
    assert "time budget spent: 9 iterations in " in capsys.readouterr().out
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 9
    # --eval_only reads the run: no budget line (it paired the time spent with the flag's budget)
    run_train(tiny_data, out, "--init_from=resume", "--eval_only", "--time_budget=1")
    assert "time budget" not in capsys.readouterr().out
    # --time_budget=0 on a budget run's resume: the run goes on by iterations, and says so
    run_train(tiny_data, out, "--init_from=resume", "--max_iters=11", "--time_budget=0")
    assert "; it was a --time_budget=1000 run (" in capsys.readouterr().out
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 11


def test_a_stopped_budget_run_saves_the_time_it_spent(tiny_data, tmp_path, capsys):
    """A Ctrl-C of a --time_budget run saves the training time spent with the checkpoint, so that
    the resumed run goes on where the schedule was (not from its start, with the whole budget)."""
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.StopRequest, "requested", ctrl_c_at_check(2))  # after two steps
        with pytest.raises(SystemExit):
            run_train(tiny_data, out, "--time_budget=1000", "--max_iters=50", "--eval_interval=40",
                      "--lr_decay_iters=100")
    assert "saved iteration 2 to" in capsys.readouterr().err
    saved = checkpoint.load(out / "ckpt.pt")
    logs = [r for r in read_metrics(out) if "step_ms" in r]
    assert saved["iter_num"] == 2 and [r["iter"] for r in logs] == [0, 1]
    assert saved["train_seconds"] > logs[-1]["progress"] * 1000 > 0  # both steps' time
    run_train(tiny_data, out, "--init_from=resume", "--max_iters=3")
    resumed = [r for r in read_metrics(out) if "step_ms" in r and r["iter"] == 2]
    assert resumed[0]["progress"] == pytest.approx(saved["train_seconds"] / 1000)


class Clock:
    """A stand-in for time.perf_counter that the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("compile", [True, False])
def test_the_compiling_step_is_not_training_time(monkeypatch, compile):
    """With --compile the first step of a process compiles the model: start-up, left out of the
    budget (a resumed run compiles again, and its first step is left out too); every later step
    counts. Without --compile every step counts, the first one too."""
    clock = Clock()
    monkeypatch.setattr(training.time, "perf_counter", clock)
    precision = types.SimpleNamespace(device="cpu", synchronize=lambda: None)
    for spent in (0.0, 5.0):  # a new run, and a resumed one that had spent 5 s
        budget = training.TimeBudget(TrainConfig(time_budget=100.0, compile=compile), spent, precision, False)
        for step_seconds in (30.0, 2.0, 3.0):
            budget.start()
            clock.now += step_seconds
            budget.stop()
        assert budget.spent == pytest.approx(spent + (5.0 if compile else 35.0))
        assert budget.used_up is False


def test_budget_problems_are_reported():
    problems = TrainConfig(time_budget=-1.0, patience=-2).problems()
    assert any("--time_budget" in p for p in problems) and any("--patience" in p for p in problems)


@pytest.mark.parametrize("always_save", ["true", "false"])
def test_patience_stops_and_keeps_the_best(tiny_data, tmp_path, capsys, always_save):
    """A learning rate too small to move a float32 weight: the val loss never improves after its
    first evaluation, so the run stops after --patience more, and ckpt.pt is the best (the first)."""
    run_train(tiny_data, tmp_path / "out", "--learning_rate=1e-30", "--min_lr=0", "--max_iters=50",
              "--eval_interval=2", "--eval_at_start=false", "--patience=3", "--lr_decay_iters=50",
              f"--always_save_checkpoint={always_save}")
    out = capsys.readouterr().out
    evals = [r["iter"] for r in read_metrics(tmp_path / "out") if "val/loss" in r]
    assert evals == [2, 4, 6, 8]
    assert "no better val loss in 3 evaluations: stopped at iteration 8" in out
    assert checkpoint.load(tmp_path / "out" / "ckpt.pt")["iter_num"] == 2


def test_budget_run_under_torchrun_stops_together(tiny_data, tmp_path):
    """Rank 0's clock decides for both ranks: they stop at the same iteration, and it is saved."""
    args = [str(ROOT / "train.py"), f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}", *TINY,
            "--time_budget=2", "--max_iters=1000000", "--eval_interval=1000000", "--lr_decay_iters=50",
            "--gradient_accumulation_steps=2"]
    run = subprocess.run(torchrun(tmp_path / "logs", *args), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:] + rank_output(tmp_path / "logs")
    ckpt = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    assert ckpt["train_seconds"] >= 2 and ckpt["iter_num"] > 0
    assert f"time budget spent: {ckpt['iter_num']:,} iterations" in rank_output(tmp_path / "logs")


def test_patience_in_a_budget_run_says_how_much_of_the_budget_it_spent(tiny_data, tmp_path, capsys):
    run_train(tiny_data, tmp_path / "out", "--learning_rate=1e-30", "--min_lr=0", "--max_iters=500",
              "--eval_interval=2", "--eval_at_start=false", "--patience=1", "--time_budget=600")
    out = capsys.readouterr().out
    assert re.search(r"no better val loss in 1 evaluation: stopped at iteration 4, [0-9.]+ s of its "
                     r"--time_budget=600 spent; ", out), out[-600:]
