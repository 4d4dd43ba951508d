"""A run resumed on another machine may change dtype (bf16 autocast on one CPU, float32 on the
next): the state carries over exactly, the numbers stay bit-exact where the arithmetic is the
same, and close to the uninterrupted run where it is not."""
import pytest
import torch

import checkpoint
import train
from conftest import TINY, write_char_dataset

FLAGS = [f for f in TINY if not f.startswith("--dtype")] + [
    "--eval_interval=4", "--lr_decay_iters=8", "--learning_rate=1e-2", "--dropout=0.1"]
CLOSE = 5e-3  # measured: 1e-4 to 7e-4 after a switch; bf16 and float32 runs end 3e-2 apart


@pytest.fixture(scope="module")
def data(tmp_path_factory, shakespeare_text):
    folder = tmp_path_factory.mktemp("precision") / "data"
    write_char_dataset(folder, shakespeare_text[:60_000])
    return folder


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """dtype -> the checkpoint of a run to 8 iterations in that dtype (made once, when asked)."""
    runs = {}

    def get(dtype):
        if dtype not in runs:
            out = tmp_path_factory.mktemp(f"full-{dtype}")
            train.main([f"--data_dir={data}", f"--out_dir={out}", *FLAGS, f"--dtype={dtype}", "--max_iters=8"])
            runs[dtype] = checkpoint.load(out / "ckpt.pt")
        return runs[dtype]
    return get


def largest_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_bfloat16_resume_is_exact(data, tmp_path, uninterrupted):
    train.main([f"--data_dir={data}", f"--out_dir={tmp_path}", *FLAGS, "--dtype=bfloat16", "--max_iters=4"])
    train.main([f"--data_dir={data}", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=8"])
    resumed, full = checkpoint.load(tmp_path / "ckpt.pt"), uninterrupted("bfloat16")
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    assert resumed["precision"] == {"device": "cpu", "dtype": "bfloat16", "threads": torch.get_num_threads()}


@pytest.mark.parametrize("first, then", [("bfloat16", "float32"), ("float32", "bfloat16"),
                                         ("float32", "float16"), ("float16", "float32")])
def test_resume_in_another_dtype(data, tmp_path, uninterrupted, capsys, first, then):
    """float16 brings a GradScaler: its state starts fresh when the saved run had none (this
    once crashed), and is set aside when the resumed run needs none."""
    train.main([f"--data_dir={data}", f"--out_dir={tmp_path}", *FLAGS, f"--dtype={first}", "--max_iters=4"])
    train.main([f"--data_dir={data}", f"--out_dir={tmp_path}", "--init_from=resume", f"--dtype={then}",
                "--max_iters=8"])
    out = capsys.readouterr().out
    assert f"was trained on cpu in {first}, this run continues on cpu in {then}" in out
    resumed, full = checkpoint.load(tmp_path / "ckpt.pt"), uninterrupted(first)
    assert resumed["iter_num"] == 8 and resumed["config"]["dtype"] == then
    assert resumed["precision"] == {"device": "cpu", "dtype": then, "threads": torch.get_num_threads()}
    assert bool(resumed["scaler"]) == (then == "float16")
    assert all(torch.isfinite(t).all() for t in resumed["model"].values())
    assert 0 < largest_difference(resumed["model"], full["model"]) < CLOSE
    assert resumed["best_val_loss"] == pytest.approx(full["best_val_loss"], abs=1e-2)
