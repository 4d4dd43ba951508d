"""model.py and train.py: the behaviour a user relies on when training."""
import json
from pathlib import Path

import pytest
import torch

import checkpoint
import train
import training
from conftest import TINY, rank_output, torchrun
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


def tiny_model(**kw):
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    args.update(kw)
    return GPT(GPTConfig(**args))


def run_train(data_dir, out_dir, *flags):
    train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *flags])


def read_metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_attention_is_causal():
    model = tiny_model().eval()
    idx = torch.randint(0, 40, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 40
    logits_a, _ = model(idx, idx)
    logits_b, _ = model(changed, changed)
    assert torch.equal(logits_a[:, :10], logits_b[:, :10])  # the past cannot see the future
    assert not torch.allclose(logits_a[:, 10:], logits_b[:, 10:])


def test_gpt2_module_names_and_weight_tying():
    model = tiny_model()
    names = set(model.state_dict())
    for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                 "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                 "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
                 "transformer.ln_f.weight", "lm_head.weight"]:
        assert name in names
    assert model.lm_head.weight is model.transformer.wte.weight


def final_loss_on_one_batch(model, opt, steps=150):
    x = torch.randint(0, 40, (4, 16))
    y = torch.roll(x, -1, dims=1)
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_single_batch_overfits():
    model = tiny_model()
    assert final_loss_on_one_batch(model, model.configure_optimizer(0.0, 3e-3, (0.9, 0.95), "cpu")) < 0.05


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny_model()
    opt = model.configure_optimizer(0.1, 3e-3, (0.9, 0.95), "cpu", "muon")
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert adamw == set(names.values()) - muon and "transformer.wte.weight" in adamw
    assert len(opt.param_groups) == len(opt.muon.param_groups) + len(opt.adamw.param_groups)
    assert final_loss_on_one_batch(model, opt) < 0.05


def test_loss_falls_on_tiny_corpus(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "out", "--max_iters=60", "--eval_interval=30",
              "--learning_rate=1e-2", "--lr_decay_iters=60")
    evals = [r for r in read_metrics(tmp_path / "out") if "val/loss" in r]
    assert [r["iter"] for r in evals] == [0, 30, 60]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.8
    train_logs = [r for r in read_metrics(tmp_path / "out") if "tokens_per_sec" in r]
    assert len(train_logs) == 60 and all(r["tokens_per_sec"] > 0 for r in train_logs)


def test_checkpoint_save_load_identical_logits(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "out", "--max_iters=5", "--eval_interval=5")
    ckpt = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] == 5
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    assert ckpt["tokenizer"]["name"] == "char" and len(ckpt["tokenizer"]["chars"]) == ckpt["model_args"]["vocab_size"]
    model = GPT(GPTConfig(**ckpt["model_args"])).eval()
    model.load_state_dict(ckpt["model"])
    checkpoint.save({**ckpt, "model": model.state_dict()}, tmp_path / "again.pt")
    again = GPT(GPTConfig(**ckpt["model_args"])).eval()
    again.load_state_dict(checkpoint.load(tmp_path / "again.pt")["model"])
    x = torch.randint(0, ckpt["model_args"]["vocab_size"], (2, 32))
    assert torch.equal(model(x, x)[0], again(x, x)[0])
    # plain data only: the safe loader opens it
    torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)


@pytest.mark.parametrize("flags", [["--dropout=0.1", "--gradient_accumulation_steps=2"], ["--optimizer=muon"]])
def test_exact_resume(tiny_data, tmp_path, flags):
    """A run stopped at iteration 8 and resumed to 12 ends bit-identical to one run to 12."""
    common = ["--eval_interval=4", "--lr_decay_iters=12", *flags]
    run_train(tiny_data, tmp_path / "full", "--max_iters=12", *common)
    run_train(tiny_data, tmp_path / "part", "--max_iters=8", *common)
    assert checkpoint.load(tmp_path / "part" / "ckpt.pt")["iter_num"] == 8
    run_train(tiny_data, tmp_path / "part", "--max_iters=12", "--init_from=resume")
    full = checkpoint.load(tmp_path / "full" / "ckpt.pt")
    part = checkpoint.load(tmp_path / "part" / "ckpt.pt")
    assert part["iter_num"] == full["iter_num"] == 12
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, part["model"][name]), name
    assert part["best_val_loss"] == full["best_val_loss"]
    # the resumed run picked up the saved settings it was not told to change
    for flag in flags:
        key, value = flag[2:].split("=")
        assert str(part["config"][key]) == value, key


def test_best_val_loss_is_the_minimum(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "out", "--max_iters=20", "--eval_interval=5", "--learning_rate=3e-2",
              "--lr_decay_iters=20")
    vals = [r["val/loss"] for r in read_metrics(tmp_path / "out") if "val/loss" in r]
    assert checkpoint.load(tmp_path / "out" / "ckpt.pt")["best_val_loss"] == min(vals)


def test_eval_train_false_evaluates_only_the_val_split(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "both", "--max_iters=4", "--eval_interval=2")
    run_train(tiny_data, tmp_path / "val", "--max_iters=4", "--eval_interval=2", "--eval_train=false")
    both, val = ([r for r in read_metrics(tmp_path / d) if "val/loss" in r] for d in ("both", "val"))
    assert all("train/loss" in r for r in both) and not any("train/loss" in r for r in val)
    assert [r["val/loss"] for r in val] == [r["val/loss"] for r in both]  # the same val batches
    assert (tmp_path / "val" / "loss.png").stat().st_size > 0


def test_wandb_offline_summary_holds_losses(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    summaries = []
    finish = train.MetricsLog.finish

    def finish_and_keep_summary(self):  # read the real run's summary just before it closes
        summaries.append(dict(self.wandb_run.summary))
        finish(self)

    monkeypatch.setattr(train.MetricsLog, "finish", finish_and_keep_summary)
    run_train(tiny_data, tmp_path / "out", "--max_iters=4", "--eval_interval=2", "--wandb_log=true",
              "--wandb_project=test")
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))  # the offline run's file
    summary = summaries[0]
    last_eval = [r for r in read_metrics(tmp_path / "out") if "val/loss" in r][-1]
    assert summary["val/loss"] == pytest.approx(last_eval["val/loss"])
    assert summary["train/loss"] == pytest.approx(last_eval["train/loss"])


def test_lr_schedule():
    cfg = training.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, max_iters=200)
    assert training.get_lr(0, cfg) == pytest.approx(1 / 11)
    assert training.get_lr(10, cfg) == pytest.approx(1.0)
    assert training.get_lr(60, cfg) == pytest.approx(0.55)
    assert training.get_lr(110, cfg) == pytest.approx(0.1)
    assert training.get_lr(150, cfg) == pytest.approx(0.1)


def test_runs_under_torchrun_with_ddp(tiny_data, tmp_path, capsys):
    """The same train.py under torchrun: two CPU processes (gloo), then a resume. (AdamW under
    torchrun, with a stop and an exact resume, is in test_distributed.py.)"""
    import subprocess
    args = [str(ROOT / "train.py"), f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}"]
    first = subprocess.run(torchrun(tmp_path / "logs1", *args, *TINY, "--max_iters=4", "--eval_interval=2",
                                    "--lr_decay_iters=6", "--gradient_accumulation_steps=2", "--optimizer=muon"),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:] + rank_output(tmp_path / "logs1")
    second = subprocess.run(torchrun(tmp_path / "logs2", *args, "--init_from=resume", "--max_iters=6"),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:] + rank_output(tmp_path / "logs2")
    ckpt = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] == 6 and len(ckpt["rng"]["data"]) == 2  # one data sampler per rank
    assert ckpt["config"]["gradient_accumulation_steps"] == 2  # saved as the global setting
    assert ckpt["config"]["optimizer"] == "muon" and "muon" in ckpt["optimizer"]
    # the same run continued by one process: the model and optimizer go on, the two samplers cannot
    train.main([f"--out_dir={tmp_path / 'out'}", f"--data_dir={tiny_data}", "--init_from=resume", "--max_iters=8"])
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().out
    assert checkpoint.load(tmp_path / "out" / "ckpt.pt")["iter_num"] == 8
