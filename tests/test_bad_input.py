"""Bad input across prepare, train and sample: a non-zero exit, one line that names the
problem (and how to fix it), no traceback, and nothing lost."""
import codecs
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
    (root / "pictures").mkdir()
    (root / "pictures" / "notes.txt").write_text("to be or not to be\n" * 50)
    (root / "pictures" / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "short.txt").write_text("to be or not to be\n")
    (root / "utf16.txt").write_text("Caf\u00e9 cr\u00e8me\n" * 100, encoding="utf-16")  # Notepad's "Unicode"
    (root / "notepad").mkdir()
    (root / "notepad" / "a.txt").write_bytes(codecs.BOM_UTF16_BE + ("to be or not to be\n" * 50).encode("utf-16-be"))
    (root / "syntax.py").write_text("batch_size = = 3\n")
    (root / "typo.py").write_text("n_layers = 3\n")
    (root / "blocker").write_text("a file where a folder should be")
    for name in ("truncated", "foreign", "evil", "nanogpt"):
        (root / name).mkdir()
    ckpt = (root / "out" / "ckpt.pt").read_bytes()
    (root / "truncated" / "ckpt.pt").write_bytes(ckpt[: len(ckpt) // 3])
    torch.save({"weights": torch.ones(2)}, root / "foreign" / "ckpt.pt")
    torch.save({"model": {"transformer.wte.weight": torch.ones(2)}, "optimizer": {}, "iter_num": 5000,  # nanoGPT's
                "model_args": {"n_layer": 6}, "best_val_loss": torch.tensor(1.47), "config": {"dataset": "x"}},
               root / "nanogpt" / "ckpt.pt")
    torch.save({"format": "nanogpt-ckpt", "x": os.system}, root / "evil" / "ckpt.pt")  # would run code
    broken = data / "broken"
    write_char_dataset(data, shakespeare_text[:30_000], name="broken")
    (broken / "train.bin").write_bytes((broken / "train.bin").read_bytes()[:-10])
    # the same number of characters, one of them another: a vocab_size check alone lets it through
    write_char_dataset(data, shakespeare_text[:30_000].replace("e", "\u00a7"), name="swapped")
    write_char_dataset(data, shakespeare_text[:30_000], name="badmeta")
    (data / "badmeta" / "meta.json").write_text("{not json")
    return root


def T(*flags):  # train.py on the tiny dataset
    return ("train", ["--data_dir={data}", "--out_dir={root}/new", *TINY, "--max_iters=2", *flags])


def R(*flags):  # train.py resuming the trained checkpoint
    return ("train", ["--data_dir={data}", "--out_dir={root}/out", "--init_from=resume", *flags])


def S(*flags):  # sample.py on the trained checkpoint
    return ("sample", ["--out_dir={root}/out", "--max_new_tokens=5", *flags])


def SI(*flags):  # sample.py on a Hugging Face model (--init_from), not the checkpoint
    return ("sample", ["--max_new_tokens=5", *flags])


def P(*flags):  # prepare.py into a scratch data folder
    return ("prepare", ["--data_dir={root}/prepared", *flags])


CASES = {
    # train.py: flags and config files
    "train unknown flag": (T("--batchsize=3"), "did you mean --batch_size"),
    "train bad integer": (T("--batch_size=abc"), "--batch_size must be an integer"),
    "train batch_size 0": (T("--batch_size=0"), "--batch_size must be at least 1"),
    "train accumulation 0": (T("--gradient_accumulation_steps=0"), "--gradient_accumulation_steps must be at least 1"),
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
    "train missing dataset": (T("--dataset=nope"), "run `python prepare.py --input FILE --name nope --data_dir {root}/data`"),
    "train missing dataset with a space": (T("--dataset=my data"), "`python prepare.py --input FILE --name \"my data\" "),
    "train missing named dataset": (T("--dataset=shakespeare"), "run `python prepare.py shakespeare --data_dir {root}/data` or"),
    "train block larger than split": (T("--block_size=5000"), "too few for one window"),
    "train damaged bin": (T("--dataset=broken"), "damaged"),
    "train bad meta.json": (T("--dataset=badmeta"), "not a valid meta.json"),
    "train out_dir under a file": (T("--out_dir={root}/blocker/out"), "cannot create --out_dir"),
    "train out_dir a file": (T("--out_dir={root}/short.txt"), "short.txt: it is a file, not a folder"),
    "train empty dataset": (T("--dataset="), "--dataset is empty"),
    "train batch beyond memory": (T("--batch_size=100000000000", "--out_dir={root}/big_batch"), "out of memory"),
    # train.py: a new run where another left its model (the model is kept)
    "train new run over a model": (("train", ["--data_dir={data}", "--out_dir={root}/out", *TINY, "--max_iters=2"]),
                                   "already holds a model (ckpt.pt) that this new run would replace"),
    "train finetune into its source": (("train", ["--data_dir={data}", "--dataset=tiny", "--out_dir={root}/out",
                                                  "--init_from={root}/out", "--max_iters=2", "--warmup_iters=0",
                                                  "--device=cpu"]), "continue it with --init_from=resume"),
    # train.py: resuming
    "resume with no checkpoint": (T("--init_from=resume"), "no checkpoint at"),
    "resume shape conflict": (R("--n_layer=5"), "different model shape"),
    "resume optimizer conflict": (R("--optimizer=muon"), "--optimizer=muon (checkpoint has adamw)"),
    "resume truncated checkpoint": (R("--out_dir={root}/truncated"), "truncated or corrupted"),
    "resume foreign checkpoint": (R("--out_dir={root}/foreign"), "not a checkpoint of this project"),
    "resume pickled code": (R("--out_dir={root}/evil"), "not plain data"),
    "resume bad setting": (R("--warmup_iters=-5"), "--warmup_iters must be >= 0"),
    "resume on other characters": (R("--dataset=swapped", "--max_iters=4"), "has '\u00a7', which the model never saw, and lacks 'e'"),
    "train seed beyond 64 bits": (T("--seed=18446744073709551615"), "--seed must be between 0 and"),
    "train empty out_dir": (("train", ["--data_dir={data}", "--out_dir=", *TINY]), "--out_dir is empty"),
    "train eval_only over a trained model": (("train", ["--data_dir={data}", "--out_dir={root}/out", *TINY,
                                                        "--eval_only=True"]), "add --init_from=resume to evaluate"),
    "sample negative seed": (S("--seed=-1"), "--seed must be between 0 and"),
    # sample.py
    "sample missing out_dir": (("sample", ["--out_dir={root}/nowhere"]), "no checkpoint at"),
    "sample foreign checkpoint": (S("--out_dir={root}/foreign"), "not a checkpoint of this project"),
    "sample nanoGPT's checkpoint": (S("--out_dir={root}/nanogpt"), "is a checkpoint of nanoGPT itself, which this "
                                    "project does not read; train the model again here with the same settings"),
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
    "prepare not utf-8": (P("--input", "{root}/latin1.txt", "--name=x", "--tokenizer=char"),
                          "invalid byte at offset 3 (line 1); convert it (a Latin-1 file: `iconv -f latin1 -t "
                          "utf-8`, or Notepad's Save as, Encoding: UTF-8), or mend that byte"),
    "prepare utf-16": (P("--input", "{root}/utf16.txt", "--name=x", "--tokenizer=char"),
                       "utf16.txt is UTF-16 text (Windows Notepad's \"Unicode\""),
    "prepare utf-16 in a folder": (P("--input", "{root}/notepad", "--name=x", "--tokenizer=char"),
                                   "is UTF-16 text (Windows Notepad's \"Unicode\", what Windows PowerShell's `>` "
                                   "writes), not UTF-8: save it as UTF-8"),
    "prepare a picture in the folder": (P("--input", "{root}/pictures", "--name=x", "--tokenizer=char"),
                                        "photo.png is not a text file (an image, an archive, a program?); leave it "
                                        "out of --input (move it out of the folder)"),
    "prepare split too small": (P("--input", "{root}/short.txt", "--name=x", "--tokenizer=char"), "block_size"),
    "prepare unknown tokenizer": (P("--input", "{root}/short.txt", "--name=x", "--tokenizer=gpt9"), "gpt9"),
    "prepare nothing to do": (P(), "--input"),
    "prepare template for plain text": (P("--input", "{root}/short.txt", "--name=x", "--tokenizer=char",
                                          "--template", "{root}/nope.json"), "--template joins the records"),
    "prepare unwritable destination": (("prepare", ["--data_dir={root}/blocker/data", "--input",
                                                    "{root}/short.txt", "--name=x", "--tokenizer=char",
                                                    "--block_size=4"]), "blocker"),
}

MAINS = {"train": train.main, "sample": sample.main, "prepare": prepare.main}


def fingerprint(root: Path) -> dict:
    """Every file under root, by content, and every folder: nothing a user had may change, and
    a run that fails leaves no folder of its own behind (an empty out_dir, say)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*")) if "new" not in p.parts}


def error_line(main, args, root: Path, capsys, code=None) -> str:
    """Run main(args) as a user would: it must exit non-zero (with `code`, when given) with one
    `error:` line on stderr and no traceback, and leave every file under root as it was.
    Returns that line."""
    before = fingerprint(root)
    with pytest.raises(SystemExit) as e:
        run_main(main, args)
    assert e.value.code not in (0, None) if code is None else e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert fingerprint(root) == before  # nothing lost, nothing half written
    return err[0]


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30
    assert {script for (script, _), _ in CASES.values()} == {"train", "sample", "prepare"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clear_line(name, world, capsys):
    (script, args), message = CASES[name]
    args = [a.format(root=world, data=world / "data") for a in args]
    assert message.format(root=world) in error_line(MAINS[script], args, world, capsys)


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


# ---------------------------------------------------------------------------- more of the same
# Every script and input a user touches: flags, config files, datasets, checkpoints, a folder
# another run is using, bench.py. Same rule: one `error:` line, a non-zero exit, nothing lost.

import json  # noqa: E402
import select  # noqa: E402

import bench  # noqa: E402
import bench_prepare  # noqa: E402

# holds a runlock lock until killed, as a running train.py or prepare.py would
LOCK_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import runlock
runlock.FolderLock(sys.argv[2], "the folder", "choose another").acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def more_world(world):
    """world, plus more broken files and two folders held by other (live) processes."""
    root, data = world, world / "data"
    (root / "raises.py").write_text("batch_size = 1 / 0\n")
    (root / "wrongtype.py").write_text("batch_size = 'big'\n")
    (root / "folder.py").mkdir()
    (root / "emptydir").mkdir()
    (root / "medium.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    write_char_dataset(data, "abcd" * 1000, name="other")  # 4 characters: not the checkpoint's vocabulary
    for name, edit in [("novocab", lambda m: m.pop("vocab_size")), ("baddtype", lambda m: m.update(dtype="float99"))]:
        folder = write_char_dataset(data, "abcd" * 1000, name=name)
        meta = json.loads((folder / "meta.json").read_text())
        edit(meta)
        (folder / "meta.json").write_text(json.dumps(meta))
    folder = write_char_dataset(data, "abcd" * 1000, name="noval")
    (folder / "val.bin").unlink()
    good = torch.load(root / "out" / "ckpt.pt", weights_only=True)
    for name, ckpt in [("future", {**good, "version": 99}),
                       ("nomodel", {k: v for k, v in good.items() if k != "model"}),
                       ("shapes", {**good, "model_args": {**good["model_args"], "n_layer": 3}}),
                       ("newargs", {**good, "model_args": {**good["model_args"], "n_expert": 8}})]:
        (root / name).mkdir()
        torch.save(ckpt, root / name / "ckpt.pt")
    (root / "emptyckpt").mkdir()
    (root / "emptyckpt" / "ckpt.pt").write_bytes(b"")
    (root / "dirckpt" / "ckpt.pt").mkdir(parents=True)
    (root / "busy").mkdir()
    (root / "prepared").mkdir(exist_ok=True)
    holders = [subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(ROOT), str(path)],
                                stdout=subprocess.PIPE, text=True)
               for path in (root / "busy" / "train.lock", root / "prepared" / ".busy.lock")]
    try:
        for holder in holders:
            ready, _, _ = select.select([holder.stdout], [], [], 120)  # bounded: a hung holder fails
            assert ready and holder.stdout.readline() == "held\n"
        yield root
    finally:
        for holder in holders:
            holder.kill()
            holder.communicate(timeout=30)


def B(*flags):  # bench.py, which needs no dataset
    return ("bench", list(flags))


MORE_CASES = {
    # train.py: settings that cannot work, all caught before any work
    "train negative max_iters": (T("--max_iters=-1"), "--max_iters must be >= 0"),
    "train beta1 of 1": (T("--beta1=1"), "--beta1 must be in [0, 1)"),
    "train negative beta2": (T("--beta2=-0.1"), "--beta2 must be in [0, 1)"),
    "train nan learning rate": (T("--learning_rate=nan"), "--learning_rate must be a finite number"),
    "train zero learning rate": (T("--learning_rate=0"), "--learning_rate must be above 0"),
    "train min_lr above learning_rate": (T("--min_lr=1"), "--min_lr (1.0) is above --learning_rate"),
    "train infinite grad_clip": (T("--grad_clip=inf"), "--grad_clip must be a finite number"),
    "train not a bool": (T("--compile=maybe"), "--compile must be true or false"),
    "train flag without a value": (T("--batch_size"), "--batch_size needs a value"),
    "train fraction for an integer": (T("--n_layer=2.5"), "--n_layer must be an integer"),
    "train no attention heads": (T("--n_head=0"), "--n_head must be at least 1"),
    "train unknown device": (T("--device=tpu"), "unknown device 'tpu'"),
    "train mps missing": (T("--device=mps"), "MPS is not available"),
    "train two mistakes in one line": (T("--batch_size=0", "--dropout=2"),
                                       "--batch_size must be at least 1, got 0; --dropout must be in [0, 1)"),
    # config files
    "train config that raises": (("train", ["{root}/raises.py"]), "ZeroDivisionError"),
    "train config value of the wrong type": (("train", ["{root}/wrongtype.py"]), "--batch_size must be an integer"),
    "train config path is a folder": (("train", ["{root}/folder.py"]), "not found"),
    # datasets
    "train meta.json without vocab_size": (T("--dataset=novocab"), "not a valid meta.json"),
    "train meta.json unknown dtype": (T("--dataset=baddtype"), "not a valid meta.json"),
    "train val.bin missing": (T("--dataset=noval"), "val.bin is missing"),
    # a folder another run holds
    "train out_dir in use": (T("--out_dir={root}/busy"), "is in use by PID"),
    "prepare dataset in use": (P("--input", "{root}/short.txt", "--name=busy", "--tokenizer=char",
                                 "--block_size=4"), "is in use by PID"),
    # checkpoints
    "resume block_size conflict": (R("--block_size=64"), "--block_size=64 (checkpoint has 32)"),
    "resume on another vocabulary": (R("--dataset=other"), "resume on the dataset it was trained on"),
    "resume empty checkpoint": (R("--out_dir={root}/emptyckpt"), "truncated or corrupted"),
    "resume checkpoint from a newer version": (R("--out_dir={root}/future"), "newer than this code reads"),
    "resume checkpoint without weights": (R("--out_dir={root}/nomodel"), "is missing model"),
    "resume ckpt.pt is a folder": (R("--out_dir={root}/dirckpt"), "no checkpoint at"),
    "sample weights that do not match": (S("--out_dir={root}/shapes"), "do not match its model_args"),
    "sample unknown model_args": (S("--out_dir={root}/newargs"), "model_args this code does not know"),
    "sample pickled code": (S("--out_dir={root}/evil"), "not plain data"),
    # sample.py
    "sample empty prompt": (S("--prompt="), "the prompt is empty"),
    "sample prompt file not utf-8": (S("--prompt=FILE:{root}/latin1.txt"),
                                     "latin1.txt is not UTF-8 text: invalid byte at offset 3 (line 1); convert it"),
    "sample prompt file utf-16": (S("--prompt=FILE:{root}/utf16.txt"), "prompt file {root}/utf16.txt is UTF-16 text"),
    "sample prompt file is a folder": (S("--prompt=FILE:{root}/emptydir"), "could not read prompt file"),
    "sample negative cpu_threads": (S("--cpu_threads=-1"), "--cpu_threads must be >= 0"),
    "sample unknown device": (S("--device=tpu"), "unknown device 'tpu'"),
    "sample cuda missing": (S("--device=cuda"), "CUDA is not available"),
    "sample unknown dtype": (S("--dtype=int8"), "unknown dtype 'int8'"),
    "sample empty out_dir": (S("--out_dir="), "--out_dir must name the folder"),
    "sample top_k not an integer": (S("--top_k=many"), "--top_k must be an integer"),
    "sample infinite temperature": (S("--temperature=inf"), "--temperature must be"),
    # prepare.py
    "prepare unknown named dataset": (P("shakespeare_word"), "unknown dataset 'shakespeare_word'"),
    "prepare name with a slash": (P("--input", "{root}/short.txt", "--name=a/b"), "must be a plain folder name"),
    "prepare hidden name": (P("--input", "{root}/short.txt", "--name=.x"), "must be a plain folder name"),
    "prepare val_fraction 0": (P("--input", "{root}/short.txt", "--name=x", "--val_fraction=0"),
                               "--val_fraction must be between 0 and 1"),
    "prepare no workers": (P("--input", "{root}/short.txt", "--name=x", "--num_workers=0"), "must be positive"),
    "prepare folder with no files": (P("--input", "{root}/emptydir", "--name=x", "--tokenizer=char"),
                                     "no files found in folder"),
    "prepare input without a name": (P("--input", "{root}/short.txt"), "pass --name NAME"),
    "prepare val split too small": (P("--input", "{root}/medium.txt", "--name=x", "--tokenizer=char",
                                      "--block_size=64", "--val_fraction=0.01"), "the val split has"),
    "prepare not an integer": (P("--block_size=abc"), "invalid int value: 'abc'"),
    "prepare unknown flag": (P("--inputs", "{root}/short.txt"), "unrecognized arguments: --inputs"),
    # bench.py
    "bench vocab_size 0": (B("--vocab_size=0"), "--vocab_size must be at least 1"),
    "bench negative warmup": (B("--warmup=-1"), "--warmup must be >= 0"),
    "bench no repeats": (B("--repeats=0"), "--repeats must be at least 1"),
    "bench nothing to measure": (B("--skip_train=true", "--skip_sample=true"), "leave nothing to measure"),
    "bench unknown flag": (B("--repeat=3"), "did you mean --repeats"),
    "bench cuda missing": (B("--device=cuda"), "CUDA is not available"),
    "bench config with a typo": (("bench", ["{root}/typo.py"]), "did you mean --n_layer"),
    "bench_prepare size 0": (("bench_prepare", ["--size_mb", "0"]), "--size_mb must be above 0, got 0"),
}

MAINS["bench"] = bench.main
MAINS["bench_prepare"] = bench_prepare.main


def test_there_are_at_least_80_cases():
    assert not set(CASES) & set(MORE_CASES)
    assert len(CASES) + len(MORE_CASES) >= 80


@pytest.mark.parametrize("name", list(MORE_CASES))
def test_more_bad_input_gives_one_clear_line(name, more_world, capsys):
    (script, args), message = MORE_CASES[name]
    args = [a.format(root=more_world, data=more_world / "data") for a in args]
    assert message.format(root=more_world) in error_line(MAINS[script], args, more_world, capsys)
# ---------------------------------------------------------------------------- export.py and --init_from

@pytest.fixture(scope="module")
def hf_world(world):
    """Folders that are not GPT-2 models, or not one we can load, next to the world's checkpoint."""
    import json
    gpt2 = {"model_type": "gpt2", "vocab_size": 65, "n_positions": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}
    folders = {"llama": {"model_type": "llama"}, "relu": {**gpt2, "activation_function": "relu"},
               "huge": {**gpt2, "n_layer": 48, "n_head": 16, "n_embd": 25600},
               "badshape": {**gpt2, "n_head": 3}}
    for name, config in folders.items():
        (world / name).mkdir()
        (world / name / "config.json").write_text(json.dumps(config))
        (world / name / "model.safetensors").write_bytes(b"")
    (world / "notjson").mkdir()
    (world / "notjson" / "config.json").write_text("{oops")
    (world / "onnx").mkdir()  # what export.py --format=onnx writes, in short
    (world / "onnx" / "config.json").write_text(json.dumps(gpt2))
    (world / "onnx" / "model.onnx").write_bytes(b"onnx")
    import hf_format
    (world / "onnx" / "README.md").write_text(f"---\n{hf_format.EXPORT_MARKER}\n---\n")
    (world / "gguf").mkdir()  # a GGUF export: a card, the model file, no config.json
    (world / "gguf" / "README.md").write_text(f"---\n{hf_format.EXPORT_MARKER}\n---\n")
    (world / "gguf" / "model.gguf").write_bytes(b"GGUF")
    (world / "downloaded").mkdir()  # a llama.cpp model from elsewhere: no run of ours behind it
    (world / "downloaded" / "llama-7b.Q4_K_M.gguf").write_bytes(b"GGUF")
    return world


def E(*flags):  # export.py of the trained checkpoint
    return ("export", ["--out_dir={root}/out", "--dest={root}/new/export", *flags])


HF_CASES = {
    "export missing out_dir": (E("--out_dir={root}/nowhere"), "no checkpoint at"),
    "export foreign checkpoint": (E("--out_dir={root}/foreign"), "not a checkpoint of this project"),
    "export unknown format": (E("--format=safetensors"), "--format must be one of hf, onnx, gguf"),
    "export gguf of a char model": (E("--format=gguf"), "GPT-2 BPE models (tokenizer gpt2) only"),
    "export over a foreign folder": (E("--dest={root}/truncated"), "holds files export.py did not write"),
    "export over a file": (E("--dest={root}/short.txt"), "is a file; refusing"),
    "export under a file": (E("--dest={root}/blocker/export"), "blocker, which is a file, not a folder"),
    "export unknown flag": (E("--formt=hf"), "did you mean --format"),
    "export over the checkpoint folder": (E("--dest={root}/out", "--force"), "holds the checkpoint folder"),
    "export over a parent of the checkpoint": (E("--dest={root}", "--force"), "holds the checkpoint folder"),
    "sample init_from no such folder": (SI("--init_from={root}/nope"), "no such folder"),
    "sample init_from not a model folder": (SI("--init_from={root}/data"), "no config.json"),
    "sample init_from a run's folder": (SI("--init_from={root}/out"), "pass it as --out_dir="),
    "sample init_from an ONNX export": (SI("--init_from={root}/onnx"), "is an ONNX export"),
    "sample out_dir and init_from both": (S("--init_from={root}/relu"), "--out_dir and --init_from each choose the model"),
    "sample init_from not a GPT-2": (SI("--init_from={root}/llama"), "not a GPT-2"),
    "sample init_from damaged config": (SI("--init_from={root}/notjson"), "not valid JSON"),
    "sample init_from GPT-2 variant": (SI("--init_from={root}/relu"), "activation_function 'relu'"),
    "sample init_from too big": (SI("--init_from={root}/huge"), "GiB is available"),
    "sample init_from bad shape": (SI("--init_from={root}/badshape"), "not divisible by n_head 3"),
    "train init_from not a GPT-2": (T("--init_from={root}/llama"), "not a GPT-2"),
    "train init_from no such folder": (T("--init_from={root}/nope"), "--init_from must be scratch or resume"),
    "train init_from an ONNX export, a shape flag too": (T("--init_from={root}/onnx", "--n_layer=1"),
                                                        "is an ONNX export"),  # what it is, before the shape
    "sample out_dir an ONNX export": (S("--out_dir={root}/onnx"), "--out_dir={root}/onnx is an ONNX export"),
    "sample init_from a GGUF export": (SI("--init_from={root}/gguf"), "is a GGUF export (export.py --format=gguf): "
                                                                     "it runs in llama.cpp"),
    "sample out_dir a GGUF export": (S("--out_dir={root}/gguf"), "--out_dir={root}/gguf is a GGUF export"),
    "sample init_from another's GGUF": (SI("--init_from={root}/downloaded"), "holds a GGUF model (llama.cpp's format), "
                                                                          "which is not loaded here"),
    "export out_dir an ONNX export": (E("--out_dir={root}/onnx"), "is an ONNX export"),
    "export out_dir a Hugging Face folder": (E("--out_dir={root}/relu"), "is a Hugging Face folder, not a run's"),
}


@pytest.mark.parametrize("name", list(HF_CASES))
def test_export_and_init_from_bad_input(name, hf_world, capsys):
    import export
    (script, args), message = HF_CASES[name]
    args = [a.format(root=hf_world, data=hf_world / "data") for a in args]
    message = message.format(root=hf_world)
    assert message in error_line({**MAINS, "export": export.main}[script], args, hf_world, capsys, code=2)
    assert not (hf_world / "new").exists() and not list(hf_world.glob(".*tmp*"))  # nothing written


# Documents mode and trained vocabularies: the same promise for their inputs.
DOCUMENT_CASES = {
    "prepare unknown documents mode": (P("--input", "{root}/short.txt", "--name=x", "--documents=paragraph"),
                                       "unknown --documents mode 'paragraph'"),
    "prepare bpe:0": (P("--input", "{root}/short.txt", "--name=x", "--tokenizer=bpe:0"), "at least 257"),
    "prepare bpe:abc": (P("--input", "{root}/short.txt", "--name=x", "--tokenizer=bpe:abc"), "bpe:N"),
    "prepare bpe without a size": (P("--input", "{root}/short.txt", "--name=x", "--tokenizer=bpe"), "bpe:N"),
    "prepare vocabulary too large for the text": (
        P("--input", "{root}/lines.txt", "--name=x", "--tokenizer=bpe:5000", "--documents=line", "--block_size=4"),
        "use --tokenizer=bpe:"),
    "prepare no non-empty line": (P("--input", "{root}/blank_lines.txt", "--name=x", "--tokenizer=char",
                                    "--documents=line"), "no non-empty line"),
    "prepare one document cannot split": (P("--input", "{root}/short.txt", "--name=x", "--tokenizer=char",
                                            "--documents=line", "--block_size=4"), "too few to give train and val"),
    "prepare bad shuffle": (P("--input", "{root}/short.txt", "--name=x", "--documents=line", "--shuffle=maybe"),
                            "--shuffle must be true or false"),
    "prepare negative seed": (P("--input", "{root}/lines.txt", "--name=x", "--documents=line", "--seed=-5"),
                              "--seed must be 0 or more, got -5"),
    "prepare a named dataset in another tokenizer": (
        P("shakespeare_char", "--input", "{root}/short.txt", "--tokenizer=bpe:300"),
        "give the dataset a name of its own, e.g. --name shakespeare_char_bpe300"),
    "sample empty stop string": (S("--stop="), "--stop needs a non-empty string"),
}


@pytest.mark.parametrize("name", list(DOCUMENT_CASES))
def test_bad_document_input_gives_one_clear_line(name, world, capsys):
    (world / "blank_lines.txt").write_text("\n  \n\t\n\n")
    (world / "lines.txt").write_text("".join(f"combo {i % 7} - jab\n" for i in range(40)))
    (script, args), message = DOCUMENT_CASES[name]
    args = [a.format(root=world, data=world / "data") for a in args]
    assert message in error_line(MAINS[script], args, world, capsys, code=2)
    assert not (world / "prepared" / "x").exists()


# ---------------------------------------------------------------------------- app.py and plot.py

import app  # noqa: E402
import plot  # noqa: E402


def A(*flags):  # app.py: every case fails before a server starts
    return ("app", [*flags, "--port=1"])


SHOW_CASES = {
    "app missing out_dir": (A("--out_dir={root}/nowhere"), "no checkpoint at"),
    "app truncated checkpoint": (A("--out_dir={root}/truncated"), "truncated or corrupted"),
    "app foreign checkpoint": (A("--out_dir={root}/foreign"), "not a checkpoint of this project"),
    "app pickled code": (A("--out_dir={root}/evil"), "not plain data"),
    "app models_dir not a folder": (A("--models_dir={root}/nope"), "is not a folder"),
    "app models_dir without checkpoints": (A("--models_dir={root}/data"), "no checkpoint under"),
    "app port out of range": (("app", ["--out_dir={root}/out", "--port=70000"]), "--port must be in 1..65535"),
    "app limit 0": (A("--out_dir={root}/out", "--max_new_tokens_limit=0"), "--max_new_tokens_limit must be at least 1"),
    "app unknown flag": (A("--out_dir={root}/out", "--max_tokens_limit=5"), "did you mean --max_new_tokens_limit"),
    "app unknown dtype": (A("--out_dir={root}/out", "--dtype=float8"), "unknown dtype"),
    "app negative stream interval": (A("--out_dir={root}/out", "--stream_interval=-1"), "--stream_interval must be"),
    "app unknown fast weights": (A("--out_dir={root}/out", "--fast_weights=int4"),
                                 "--fast_weights must be auto, float32 or int8, got 'int4'"),
    "plot no folder": (("plot", []), "name at least one run folder"),
    "plot no metrics": (("plot", ["{root}/truncated"]), "no metrics.jsonl in"),
    "plot damaged metrics": (("plot", ["{root}/badmetrics"]), "line 1 is not a metrics record"),
    "plot not a png": (("plot", ["{root}/out", "--output={root}/curves.jpg"]), "--output must end in .png"),
    "plot output folder missing": (("plot", ["{root}/out", "--output={root}/nowhere/x.png"]), "does not exist"),
    "plot unknown flag": (("plot", ["{root}/out", "--outptu=x.png"]), "did you mean --output"),
}


@pytest.mark.parametrize("name", list(SHOW_CASES))
def test_app_and_plot_bad_input_give_one_clear_line(name, world, capsys):
    (script, args), message = SHOW_CASES[name]
    (world / "badmetrics").mkdir(exist_ok=True)
    (world / "badmetrics" / "metrics.jsonl").write_text('not json\n{"iter": 0, "train/loss": 4.0}\n')
    args = [a.format(root=world) for a in args]
    assert message in error_line({"app": app.main, "plot": plot.main}[script], args, world, capsys, code=2)


def test_app_without_gradio_says_what_to_install(world, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    with pytest.raises(SystemExit) as e:
        run_main(app.main, [f"--out_dir={world / 'out'}", "--port=1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: app.py needs gradio: pip install -r requirements-extras.txt\n"


def test_app_finds_no_checkpoint_beside_itself(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(app, "HERE", tmp_path)  # a Space's folder with no out*/ckpt.pt
    (tmp_path / "out-empty").mkdir()
    with pytest.raises(SystemExit) as e:
        run_main(app.main, ["--port=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: no checkpoint found: no out*/ckpt.pt beside")


def test_app_as_a_real_command(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), "--out_dir=/nonexistent/out"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""  # no server
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no checkpoint at") and "Traceback" not in proc.stderr


# fast_decode.py's sample.py setting (appended by the fast-sampling work)
FAST_DECODE_CASES = {
    "sample unknown fast_weights": (S("--fast_weights=int4"), "--fast_weights must be auto, float32 or int8"),
    "sample fast_weights typo": (S("--fast_weight=int8"), "did you mean --fast_weights"),
}


@pytest.mark.parametrize("name", list(FAST_DECODE_CASES))
def test_fast_decode_bad_input_gives_one_clear_line(name, world, capsys):
    CASES.update(FAST_DECODE_CASES)
    test_bad_input_gives_one_clear_line(name, world, capsys)


MODEL_OPTION_CASES = {
    "train unknown activation": (T("--activation=swish"), "--activation must be gelu, gelu_tanh or relu2"),
    "train unknown norm": (T("--norm=batchnorm"), "--norm must be layernorm or rmsnorm"),
    "train rotary with odd head size": (T("--rotary", "--n_embd=30"), "--rotary needs an even head size"),
    "train unknown lr_schedule": (T("--lr_schedule=linear"), "--lr_schedule must be cosine or wsd"),
    "train warmdown_frac above 1": (T("--warmdown_frac=1.5"), "--warmdown_frac must be in [0, 1]"),
    "train head_lr_scale 0": (T("--head_lr_scale=0"), "--head_lr_scale must be a finite number above 0"),
    "train negative momentum warmup": (T("--muon_momentum_warmup=-1"), "--muon_momentum_warmup must be >= 0"),
    "resume with another model option": (R("--rotary"), "--rotary=True (checkpoint has False)"),
    "train embed_lr_scale negative": (T("--embed_lr_scale=-1"), "--embed_lr_scale must be a finite number above 0"),
    "resume with another embed_lr_scale": (R("--embed_lr_scale=3"), "--embed_lr_scale=3.0 (checkpoint has 1.0)"),
}


@pytest.mark.parametrize("name", list(MODEL_OPTION_CASES))
def test_bad_model_option_gives_one_clear_line(name, world, capsys):
    (script, args), message = MODEL_OPTION_CASES[name]
    args = [a.format(root=world, data=world / "data") for a in args]
    assert message in error_line(MAINS[script], args, world, capsys, code=2)


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


def test_export_of_a_model_with_options_gpt2_lacks(tmp_path, shakespeare_text, capsys):
    """A model trained with options beyond GPT-2 exports to hf (with its modeling code) and onnx;
    gguf, which llama.cpp cannot compute for it, is one line naming what llama.cpp lacks, exit 2,
    and no --dest folder written."""
    import export
    write_char_dataset(tmp_path / "data", shakespeare_text[:20_000])
    options = ["--rotary", "--bigram", "--x0_lambdas", "--value_embeds", "--tie_head=false"]
    train.main([f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", *TINY, "--max_iters=2",
                "--eval_interval=2", *options])
    for fmt in ("hf", "onnx"):
        export.main([f"--out_dir={tmp_path / 'out'}", f"--dest={tmp_path / fmt}", f"--format={fmt}"])
    assert (tmp_path / "hf" / "modeling_nanogpt.py").is_file() and (tmp_path / "onnx" / "model.onnx").is_file()
    capsys.readouterr()
    line = error_line(export.main, [f"--out_dir={tmp_path / 'out'}", f"--dest={tmp_path / 'export'}",
                                    "--format=gguf"], tmp_path, capsys, code=2)
    assert "llama.cpp lacks a char-level vocabulary; a bigram embedding table; blocks mixing in the first " \
           "block's input (x0_lambdas); value embeddings added to attention's values." in line
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("failure", [
    MemoryError("Unable to allocate 24.6 GiB for an array with shape (100000000, 33) and data type int64"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 1280000000000 bytes. Error code 12 (Cannot alloc)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
])
def test_settings_beyond_memory_give_one_line(failure, capsys):
    """numpy's and torch's allocation failures (settings too large for the machine: sample.py's
    --num_samples=10000000000 met torch's CPU allocator) are one line naming what to lower."""
    def main(argv):
        raise failure

    with pytest.raises(SystemExit) as e:
        run_main(main, [])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: out of memory (")
    assert "--batch_size" in err[0]


def test_other_runtime_errors_keep_their_traceback():
    """A RuntimeError that is not about memory is our bug: it is not turned into a user error."""
    def main(argv):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_main(main, [])


def test_a_path_too_long_for_the_system_is_one_line(world, capsys):
    """A run folder whose name the file system refuses (over 255 bytes a name on Linux and macOS,
    260 characters a path on Windows) is one line naming the path and the fix, in every stage."""
    long = "x" * 300
    for name, args in {"train": [f"--data_dir={world / 'data'}", f"--out_dir={world / long}", *TINY],
                       "sample": [f"--out_dir={world / long}"]}.items():
        main = {"train": train.main, "sample": sample.main}[name]
        with pytest.raises(SystemExit) as e:
            run_main(main, args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, (name, err)
        assert err[0].startswith("error: ") and long in err[0] and "choose a shorter path" in err[0], (name, err)


@pytest.mark.parametrize("errno_name, fix", [("ENOSPC", "free some space"), ("EROFS", "read-only"),
                                              ("EACCES", "you may not use that path")])
def test_a_full_or_forbidden_disk_is_one_line(errno_name, fix, capsys):
    import errno

    def main(argv):  # (a failed rename names its target second: that is the path said)
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)), "out/.ckpt.pt.tmp-1",
                      None, "out/ckpt.pt")

    with pytest.raises(SystemExit) as e:
        run_main(main, [])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "out/ckpt.pt;" in err[0] and fix in err[0], err


def test_other_os_errors_keep_their_traceback():
    import errno

    def main(argv):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output"):
        run_main(main, [])


def test_a_windows_path_too_long_and_a_disk_quota_are_machine_problems_and_the_line_is_exact(capsys):
    """Windows says a path is too long with winerror 206 (its errno is EINVAL, no help); a full
    disk quota (EDQUOT) is the machine's too. The line is the OS's words, the path, the fix."""
    import errno

    import errors
    too_long = OSError(errno.EINVAL, "The filename or extension is too long")
    too_long.winerror = 206
    assert errors.machine_problem(too_long) == errors.MACHINE_PROBLEMS[errno.ENAMETOOLONG]
    assert errors.machine_problem(OSError(errno.EINVAL, "Invalid argument")) is None
    if hasattr(errno, "EDQUOT"):
        assert "disk quota" in errors.machine_problem(OSError(errno.EDQUOT, "Disk quota exceeded"))

    def main(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/ckpt.pt")

    with pytest.raises(SystemExit):
        run_main(main, [])
    assert capsys.readouterr().err == (f"error: {os.strerror(errno.ENOSPC)}: out/ckpt.pt; free some space on that "
                                       f"disk, or write to another one\n")


def test_a_reader_that_left_on_windows_ends_quietly(monkeypatch, capsys):
    """Windows says EINVAL, not EPIPE, when the reader of a pipe has left (`python sample.py |
    more`, quit early): the stage ends as on Linux, exit 0 and nothing printed, in every script."""
    import errno

    import errors

    def main(argv):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(errors.os, "name", "nt")
    monkeypatch.setattr(errors, "_to_null_device", lambda stream: True)  # pytest's captured stdout has no descriptor
    monkeypatch.setattr(sys.stderr, "close", lambda: None)
    with pytest.raises(SystemExit) as e:
        run_main(main, [])
    assert e.value.code == 0 and capsys.readouterr().err == ""

    def bad_name(argv):  # Windows' EINVAL for a name it refuses carries the name: a mistake, not a reader gone
        raise OSError(errno.EINVAL, "Invalid argument", "runs/lr:3e-4")

    with pytest.raises(SystemExit) as e:
        run_main(bad_name, [])
    assert e.value.code == 2 and capsys.readouterr().err == (
        'error: Invalid argument: runs/lr:3e-4; Windows refuses that name: no < > : " | ? * in a file or folder name\n')


def test_a_reader_that_left_sends_what_stdout_still_holds_nowhere(monkeypatch):
    """What is still buffered for a pipe whose reader left would fail again at exit (Python's
    "Exception ignored ... BrokenPipeError"): stdout is pointed at the null device first."""
    import errno

    import errors
    sent = []

    def main(argv):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(errors, "_to_null_device", lambda stream: sent.append(stream) or True)
    monkeypatch.setattr(sys.stderr, "close", lambda: None)
    with pytest.raises(SystemExit) as e:
        run_main(main, [])
    assert e.value.code == 0 and sent == [sys.stdout]


# ---------------------------------------------------------------------------- sample.py's paths and config files

SAMPLE_PATH_CASES = {
    "sample ckpt.pt as --init_from": (SI("--init_from={root}/out/ckpt.pt"),
                                      "--init_from={root}/out/ckpt.pt is a file: pass the folder that holds it"),
    "eval ckpt.pt as --out_dir": (("eval", ["--out_dir={root}/out/ckpt.pt"]), "is a file: pass the folder that holds it"),
    "eval utf-16": (("eval", ["--out_dir={root}/out", "--input={root}/utf16.txt"]), "utf16.txt is UTF-16 text"),
    "export ckpt.pt as --out_dir": (("export", ["--out_dir={root}/out/ckpt.pt", "--dest={root}/x"]),
                                    "is a file: pass the folder that holds it"),
    "sample ckpt.pt as --out_dir": (S("--out_dir={root}/out/ckpt.pt"), "is a file: pass the folder that holds it (a run's ckpt.pt, or a Hugging Face model), --out_dir={root}/out"),
    "sample FILE: without a name": (S("--prompt=FILE:"), "--prompt=FILE: needs a file name after FILE:"),
    "sample FILE: a folder": (S("--prompt=FILE:{root}"), "it is a folder; name a text file in it"),
    "sample FILE: without a name, interactive": (S("--prompt=FILE:", "--interactive"), "needs a file name"),
}


@pytest.mark.parametrize("name", list(SAMPLE_PATH_CASES))
def test_sample_paths_give_one_clear_line(name, world, capsys):
    import eval as evaluate
    import export
    MAINS.update(eval=evaluate.main, export=export.main)
    (script, args), message = SAMPLE_PATH_CASES[name]
    args = [a.format(root=world) for a in args]
    assert message.format(root=world) in error_line(MAINS[script], args, world, capsys, code=2)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.name)
def test_a_training_config_given_to_sample_or_eval_says_which_out_dir(config, world, capsys):
    """Not an unknown-setting error for each training key: one short line naming the --out_dir."""
    import runpy
    import eval as evaluate
    out_dir = runpy.run_path(str(config))["out_dir"]
    for main, prog in ((sample.main, "sample.py"), (evaluate.main, "eval.py")):
        line = error_line(main, [str(config)], world, capsys, code=2)
        assert line.startswith(f"error: {config} is a config for another script: ") and f"are not {prog}'s" in line
        assert line.endswith(f"; to use the model it trains, pass --out_dir={out_dir} instead of the file")
