"""Bad input across prepare, train and sample: a non-zero exit, one line that names the
problem (and how to fix it), no traceback, and nothing lost."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prepare
import sample
import train
from conftest import TINY, write_char_dataset
from errors import run_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, shakespeare_text):
    """A prepared dataset, a trained checkpoint, and a gallery of broken files."""
    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    write_char_dataset(data, shakespeare_text[:30_000])
    train.main([f"--data_dir={data}", f"--out_dir={root / 'out'}", *TINY, "--max_iters=2", "--eval_interval=2"])
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "short.txt").write_text("to be or not to be\n")
    (root / "syntax.py").write_text("batch_size = = 3\n")
    (root / "typo.py").write_text("n_layers = 3\n")
    (root / "blocker").write_text("a file where a folder should be")
    for name in ("truncated", "foreign", "evil"):
        (root / name).mkdir()
    ckpt = (root / "out" / "ckpt.pt").read_bytes()
    (root / "truncated" / "ckpt.pt").write_bytes(ckpt[: len(ckpt) // 3])
    torch.save({"weights": torch.ones(2)}, root / "foreign" / "ckpt.pt")
    torch.save({"format": "nanogpt-ckpt", "x": os.system}, root / "evil" / "ckpt.pt")  # would run code
    broken = data / "broken"
    write_char_dataset(data, shakespeare_text[:30_000], name="broken")
    (broken / "train.bin").write_bytes((broken / "train.bin").read_bytes()[:-10])
    write_char_dataset(data, shakespeare_text[:30_000], name="badmeta")
    (data / "badmeta" / "meta.json").write_text("{not json")
    return root


def T(*flags):  # train.py on the tiny dataset
    return ("train", ["--data_dir={data}", "--out_dir={root}/new", *TINY, "--max_iters=2", *flags])


def R(*flags):  # train.py resuming the trained checkpoint
    return ("train", ["--data_dir={data}", "--out_dir={root}/out", "--init_from=resume", *flags])


def S(*flags):  # sample.py on the trained checkpoint
    return ("sample", ["--out_dir={root}/out", "--max_new_tokens=5", *flags])


def P(*flags):  # prepare.py into a scratch data folder
    return ("prepare", ["--data_dir={root}/prepared", *flags])


CASES = {
    # train.py: flags and config files
    "train unknown flag": (T("--batchsize=3"), "did you mean --batch_size"),
    "train bad integer": (T("--batch_size=abc"), "--batch_size must be an integer"),
    "train batch_size 0": (T("--batch_size=0"), "--batch_size must be at least 1"),
    "train accumulation 0": (T("--gradient_accumulation_steps=0"), "--gradient_accumulation_steps must be at least 1"),
    "train warmup longer than run": (T("--warmup_iters=50"), "longer than the run"),
    "train decay shorter than warmup": (T("--lr_decay_iters=1", "--warmup_iters=2"), "shorter than --warmup_iters"),
    "train negative learning rate": (T("--learning_rate=-1"), "--learning_rate must be a finite number"),
    "train dropout 1": (T("--dropout=1"), "--dropout must be in [0, 1)"),
    "train heads do not divide": (T("--n_head=3"), "divisible by --n_head"),
    "train unknown init_from": (T("--init_from=gpt7"), "--init_from must be scratch or resume"),
    "train unknown optimizer": (T("--optimizer=sgd"), "--optimizer must be adamw or muon"),
    "train unknown dtype": (T("--dtype=float8"), "unknown dtype"),
    "train cuda missing": (T("--device=cuda"), "CUDA is not available"),
    "train missing config file": (("train", ["{root}/nope.py"]), "not found"),
    "train config syntax error": (("train", ["{root}/syntax.py"]), "line 1"),
    "train config unknown key": (("train", ["{root}/typo.py"]), "did you mean --n_layer"),
    "train stray argument": (T("batch_size=3"), "settings are passed as --key=value"),
    # train.py: data
    "train missing dataset": (T("--dataset=nope"), "run `python prepare.py nope`"),
    "train block larger than split": (T("--block_size=5000"), "too few for one window"),
    "train damaged bin": (T("--dataset=broken"), "damaged"),
    "train bad meta.json": (T("--dataset=badmeta"), "not a valid meta.json"),
    "train out_dir under a file": (T("--out_dir={root}/blocker/out"), "cannot create --out_dir"),
    # train.py: resuming
    "resume with no checkpoint": (T("--init_from=resume"), "no checkpoint at"),
    "resume shape conflict": (R("--n_layer=5"), "different model shape"),
    "resume optimizer conflict": (R("--optimizer=muon"), "--optimizer=muon (checkpoint has adamw)"),
    "resume truncated checkpoint": (R("--out_dir={root}/truncated"), "truncated or corrupted"),
    "resume foreign checkpoint": (R("--out_dir={root}/foreign"), "not a checkpoint of this project"),
    "resume pickled code": (R("--out_dir={root}/evil"), "not plain data"),
    "resume bad setting": (R("--warmup_iters=-5"), "--warmup_iters must be >= 0"),
    # sample.py
    "sample missing out_dir": (("sample", ["--out_dir={root}/nowhere"]), "no checkpoint at"),
    "sample foreign checkpoint": (S("--out_dir={root}/foreign"), "not a checkpoint of this project"),
    "sample truncated checkpoint": (S("--out_dir={root}/truncated"), "truncated or corrupted"),
    "sample negative temperature": (S("--temperature=-1"), "--temperature must be"),
    "sample nan temperature": (S("--temperature=nan"), "--temperature must be"),
    "sample negative top_k": (S("--top_k=-5"), "--top_k must be"),
    "sample top_p 0": (S("--top_p=0"), "--top_p must be in (0, 1]"),
    "sample top_p above 1": (S("--top_p=1.5"), "--top_p must be in (0, 1]"),
    "sample no samples": (S("--num_samples=0"), "--num_samples must be at least 1"),
    "sample negative length": (S("--max_new_tokens=-1"), "--max_new_tokens must be"),
    "sample unknown characters": (S("--prompt=ROMEO ☃ 🙂"), "--drop_unknown"),
    "sample missing prompt file": (S("--prompt=FILE:{root}/nope.txt"), "nope.txt"),
    "sample unknown flag": (S("--temprature=0.5"), "did you mean --temperature"),
    # prepare.py
    "prepare missing input": (P("--input", "{root}/nope.txt", "--name=x"), "nope.txt"),
    "prepare empty input": (P("--input", "{root}/empty.txt", "--name=x", "--tokenizer=char"), "empty"),
    "prepare not utf-8": (P("--input", "{root}/latin1.txt", "--name=x", "--tokenizer=char"), "byte"),
    "prepare split too small": (P("--input", "{root}/short.txt", "--name=x", "--tokenizer=char"), "block_size"),
    "prepare unknown tokenizer": (P("--input", "{root}/short.txt", "--name=x", "--tokenizer=gpt9"), "gpt9"),
    "prepare nothing to do": (P(), "--input"),
    "prepare unwritable destination": (("prepare", ["--data_dir={root}/blocker/data", "--input",
                                                    "{root}/short.txt", "--name=x", "--tokenizer=char",
                                                    "--block_size=4"]), "blocker"),
}

MAINS = {"train": train.main, "sample": sample.main, "prepare": prepare.main}


def fingerprint(root: Path) -> dict:
    """Every file under root, by content: nothing a user had may change."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "new" not in p.parts}


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30
    assert {script for (script, _), _ in CASES.values()} == {"train", "sample", "prepare"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clear_line(name, world, capsys):
    (script, args), message = CASES[name]
    args = [a.format(root=world, data=world / "data") for a in args]
    before = fingerprint(world)
    with pytest.raises(SystemExit) as e:
        run_main(MAINS[script], args)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message.format(root=world) in err[0]
    assert "Traceback" not in err[0]
    assert fingerprint(world) == before  # nothing lost, nothing half written


@pytest.mark.parametrize("script, args", [
    ("train.py", ["--batch_size=0", "--n_layer=x"]),
    ("sample.py", ["--out_dir=/nonexistent/out"]),
    ("prepare.py", ["--input", "/nonexistent.txt", "--name=x"]),
])
def test_as_a_real_command(script, args, tmp_path):
    """The same through the real command line: exit 2, one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr


MODEL_OPTION_CASES = {
    "train unknown activation": (T("--activation=swish"), "--activation must be gelu, gelu_tanh or relu2"),
    "train unknown norm": (T("--norm=batchnorm"), "--norm must be layernorm or rmsnorm"),
    "train rotary with odd head size": (T("--rotary", "--n_embd=30"), "--rotary needs an even head size"),
    "train unknown lr_schedule": (T("--lr_schedule=linear"), "--lr_schedule must be cosine or wsd"),
    "train warmdown_frac above 1": (T("--warmdown_frac=1.5"), "--warmdown_frac must be in [0, 1]"),
    "train head_lr_scale 0": (T("--head_lr_scale=0"), "--head_lr_scale must be a finite number above 0"),
    "train negative momentum warmup": (T("--muon_momentum_warmup=-1"), "--muon_momentum_warmup must be >= 0"),
    "resume with another model option": (R("--rotary"), "--rotary=True (checkpoint has False)"),
}


@pytest.mark.parametrize("name", list(MODEL_OPTION_CASES))
def test_bad_model_option_gives_one_clear_line(name, world, capsys):
    (script, args), message = MODEL_OPTION_CASES[name]
    args = [a.format(root=world, data=world / "data") for a in args]
    before = fingerprint(world)
    with pytest.raises(SystemExit) as e:
        run_main(MAINS[script], args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert fingerprint(world) == before


def test_bigram_on_a_large_vocabulary_is_refused(tmp_path, capsys):
    """The bigram table has vocab^2 rows: on a 1,100-character vocabulary train.py refuses it."""
    text = "".join(chr(0x4E00 + i) for i in range(1100)) * 3
    write_char_dataset(tmp_path / "data", text, name="wide")
    with pytest.raises(SystemExit) as e:
        run_main(train.main, [f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", *TINY,
                              "--dataset=wide", "--bigram", "--max_iters=2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bigram needs a vocabulary of at most 1024" in err[0], err
    assert not (tmp_path / "out" / "ckpt.pt").exists()
