"""prepare.py: exact round trips, chunking that never changes BPE tokens, the meta.json
contract, atomic writes, and one clear line for every bad input."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

import prepare
from conftest import ROOT, SHARED
from errors import UserError
from tokenizer import Tokenizer

SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
EOT = "<|endoftext|>"


def run_prepare(data_dir, *args):
    """main() in-process, writing under data_dir."""
    prepare.main([*args, "--data_dir", str(data_dir)])


def load(data_dir, name):
    d = Path(data_dir) / name
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    train = np.fromfile(d / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(d / "val.bin", dtype=meta["dtype"])
    return meta, train, val


def write_docs(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(docs):
        p = folder / f"doc{i:02d}.txt"
        p.write_bytes(text.encode("utf-8"))
        paths.append(p)
    return paths


DOCS = ["Première ligne.\nZweite Zeile: grüße 😀\n", "第二个文件，中文。\n\n  indented\r\nend",
        "third <|endoftext|> literal, 12345 numbers\n"]


# ---------------------------------------------------------------- round trips

def test_char_round_trip_several_files_non_ascii(tmp_path):
    write_docs(tmp_path / "texts" / "sub", DOCS * 30)  # folders recurse, in sorted order
    write_docs(tmp_path / "texts" / ".git", ["hidden files and folders are skipped"])
    (tmp_path / "texts" / ".notes.txt").write_text("skipped too", encoding="utf-8")
    # a tiny chunk size: reads split multi-byte characters, many chunks per file
    run_prepare(tmp_path / "data", "--input", str(tmp_path / "texts"), "--name", "c", "--tokenizer", "char",
                "--chunk_size", "7", "--block_size", "8")
    meta, train, val = load(tmp_path / "data", "c")
    tok = Tokenizer.from_description(meta)
    assert meta["dtype"] == "uint16" and meta["eot_id"] is None
    # char: files concatenated, read as text (the "\r\n" of DOCS[1] as "\n")
    assert tok.decode(np.concatenate([train, val])) == "".join(DOCS * 30).replace("\r\n", "\n")
    assert meta["chars"] == sorted(set("".join(DOCS)) - {"\r"})


def test_input_given_twice_reads_both(tmp_path, capsys):
    """--input a --input b is both files, as --input a b (not the last one alone); preparing a
    name again says that it replaced the dataset there."""
    paths = write_docs(tmp_path / "texts", ["first file\n" * 40, "second file\n" * 40])
    run_prepare(tmp_path / "data", "--input", str(paths[0]), "--name", "two", "--tokenizer", "char", "--block_size", "8")
    assert "replacing" not in capsys.readouterr().out
    run_prepare(tmp_path / "data", "--input", str(paths[0]), "--input", str(paths[1]), "--name", "two",
                "--tokenizer", "char", "--block_size", "8")
    assert "(replacing the dataset prepared there before)" in capsys.readouterr().out
    meta, train, val = load(tmp_path / "data", "two")
    assert [s["path"] for s in meta["sources"]] == [str(p) for p in paths]
    assert Tokenizer.from_description(meta).decode(np.concatenate([train, val])) == "first file\n" * 40 + "second file\n" * 40


@pytest.mark.parametrize("name,dtype", [("gpt2", "uint16"), ("cl100k_base", "uint32"), ("o200k_base", "uint32")])
def test_bpe_round_trip_documents_joined_by_eot(tmp_path, name, dtype):
    paths = write_docs(tmp_path / "texts", DOCS * 20)
    run_prepare(tmp_path / "data", "--input", *map(str, paths), "--name", "b", "--tokenizer", name,
                "--chunk_size", "16", "--block_size", "8")
    meta, train, val = load(tmp_path / "data", "b")
    ids = np.concatenate([train, val])
    tok = Tokenizer.from_description(meta)
    assert meta["dtype"] == dtype and meta["vocab_size"] == tok.vocab_size
    assert tok.decode(ids) == EOT.join(DOCS * 20).replace("\r\n", "\n")  # read as text
    assert (ids == tok.eot_id).sum() == len(paths) - 1  # only the joins, never the literal text
    assert ids.max() < tok.vocab_size


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_named_dataset_with_input_equals_one_shot_encode(tmp_path, shakespeare_text, name):
    named = ["--name", f"shakespeare_{name}"] if name != "gpt2" else []  # the name is gpt2's tokens
    run_prepare(tmp_path / "data", "shakespeare", "--input", str(SHAKESPEARE), "--tokenizer", name,
                "--chunk_size", "4096", *named)
    meta, train, val = load(tmp_path / "data", f"shakespeare_{name}" if named else "shakespeare")
    ids = np.concatenate([train, val])
    assert ids.tolist() == tiktoken.get_encoding(name).encode_ordinary(shakespeare_text)


# ---------------------------------------------------------------- chunking

def chunked_ids(enc, text, chunk_size, read_size):
    pieces = [text[i:i + read_size] for i in range(0, len(text), read_size)]
    chunks = list(prepare.chunk_text(pieces, chunk_size, max_chunk=10 ** 9))
    assert "".join(chunks) == text
    return [i for c in chunks for i in enc.encode_ordinary(c)], len(chunks)


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base", "o200k_base"])
def test_chunked_shakespeare_equals_one_shot(shakespeare_text, name):
    enc = tiktoken.get_encoding(name)
    text = shakespeare_text[:200_000]
    ids, n_chunks = chunked_ids(enc, text, 500, 300)
    assert n_chunks > 300
    assert ids == enc.encode_ordinary(text)


# Pieces where a careless cut changes the tokens: whitespace runs before newlines, CRLF,
# punctuation + newline + "/", contractions, digit runs, CJK, marks, unicode spaces.
FRAGMENTS = ["\n", "\n\n", " \n", "\r\n", "\t", "  ", " ", "a", "Word", "x", "don't", "'s", "'ll",
             "12345", "7", ".", ",\n", "!?", ".\n/", "/", "\n/", "<|endoftext|>", "你好", "。", "é",
             "e\u0301", "😀", "\u00a0", "\u2028", "\x85", "\x1c", "ﬁ", "ǅ", "ÀB", "½", "Ⅷ", "_", "-\n-"]


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base", "o200k_base"])
def test_chunked_adversarial_equals_one_shot(name):
    enc = tiktoken.get_encoding(name)
    rng = random.Random(0)
    for trial in range(150):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 120)))
        for chunk_size in (1, 2, 5, 16):
            ids, _ = chunked_ids(enc, text, chunk_size, rng.randint(1, 9))
            assert ids == enc.encode_ordinary(text), (trial, chunk_size, text)


def test_chunk_text_hard_cut_bounds_memory():
    chunks = list(prepare.chunk_text(["@" * 1000], 10, max_chunk=40))
    assert "".join(chunks) == "@" * 1000 and max(map(len, chunks)) <= 40


# ---------------------------------------------------------------- meta.json and split

def test_meta_json_contract_and_deterministic_split(tmp_path, shakespeare_text):
    data = tmp_path / "data"
    run_prepare(data, "shakespeare_char", "--input", str(SHAKESPEARE))
    meta, train, val = load(data, "shakespeare_char")
    assert meta["version"] == 1 and meta["tokenizer"] == "char" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 65 == len(meta["chars"]) and meta["eot_id"] is None
    n = len(shakespeare_text)
    assert (meta["train_tokens"], meta["val_tokens"]) == (int(n * 0.9), n - int(n * 0.9))  # nanoGPT split
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert meta["sources"] == [{"path": str(SHAKESPEARE), "bytes": 1115394,
                                "sha256": prepare.SHAKESPEARE_SHA256}]
    tok = Tokenizer.from_description(meta)
    assert tok.decode(val) == shakespeare_text[int(n * 0.9):]  # val is the end of the text
    first = [(data / "shakespeare_char" / f).read_bytes() for f in prepare.OUTPUTS]
    run_prepare(data, "shakespeare_char", "--input", str(SHAKESPEARE))
    assert [(data / "shakespeare_char" / f).read_bytes() for f in prepare.OUTPUTS] == first
    assert os.listdir(data) == ["shakespeare_char"]  # no temporary folders left behind


def test_named_dataset_uses_and_keeps_local_input_txt(tmp_path, shakespeare_text):
    data = tmp_path / "data"
    (data / "shakespeare_char").mkdir(parents=True)
    shutil.copy(SHAKESPEARE, data / "shakespeare_char" / "input.txt")
    for _ in range(2):  # the second run replaces the dataset and must keep input.txt
        run_prepare(data, "shakespeare_char", "--val_fraction", "0.2")
        meta, train, val = load(data, "shakespeare_char")
        assert (data / "shakespeare_char" / "input.txt").read_text(encoding="utf-8") == shakespeare_text
        assert meta["sources"][0]["path"] == str(data / "shakespeare_char" / "input.txt")
        assert len(val) == len(shakespeare_text) - int(len(shakespeare_text) * 0.8)


def test_a_local_input_txt_that_is_not_the_corpus_is_said(tmp_path, shakespeare_text, capsys):
    """A student's own input.txt in data/shakespeare_char/ (or a stale one): `prepare.py
    shakespeare_char` builds from it, as before, and now says it is not the corpus (it was silent)."""
    data = tmp_path / "data"
    (data / "shakespeare_char").mkdir(parents=True)
    (data / "shakespeare_char" / "input.txt").write_text(shakespeare_text[:5000], encoding="utf-8")
    run_prepare(data, "shakespeare_char", "--block_size", "8")
    out = capsys.readouterr().out
    assert (f"note: {data / 'shakespeare_char' / 'input.txt'} is not tiny Shakespeare as downloaded (another "
            f"sha256); the dataset is built from it: delete it to download the corpus, or pass --input PATH") in out
    meta, train, val = load(data, "shakespeare_char")
    assert len(train) + len(val) == 5000
    shutil.copy(SHAKESPEARE, data / "shakespeare_char" / "input.txt")  # the real one: nothing to say
    run_prepare(data, "shakespeare_char")
    assert "note:" not in capsys.readouterr().out


# ---------------------------------------------------------------- atomic writes

def test_failure_mid_write_keeps_the_old_dataset(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_docs(tmp_path / "a", ["old text " * 200])
    run_prepare(data, "--input", str(tmp_path / "a"), "--name", "d", "--tokenizer", "char", "--block_size", "8")
    before = {f: (data / "d" / f).read_bytes() for f in prepare.OUTPUTS}

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing")

    write_docs(tmp_path / "b", ["brand new words " * 300])
    monkeypatch.setattr(prepare, "split_tail", crash)  # after train.bin is written, before meta.json
    with pytest.raises(RuntimeError):
        run_prepare(data, "--input", str(tmp_path / "b"), "--name", "d", "--tokenizer", "char", "--block_size", "8")
    assert {f: (data / "d" / f).read_bytes() for f in prepare.OUTPUTS} == before
    assert os.listdir(data) == ["d"]


def test_stale_temp_folders_of_killed_runs_are_removed(tmp_path):
    data = tmp_path / "data"
    stale = data / ".d.tmp-999999999-abc"  # no process has this id
    stale.mkdir(parents=True)
    (stale / "train.bin").write_bytes(b"\0" * 10)
    write_docs(tmp_path / "a", ["some text " * 100])
    run_prepare(data, "--input", str(tmp_path / "a"), "--name", "d", "--tokenizer", "char", "--block_size", "8")
    assert os.listdir(data) == ["d"]


# ---------------------------------------------------------------- bad inputs

def cli(tmp_path, *args, code=None):
    """Run prepare.py as a user would, in tmp_path; returns (returncode, stderr)."""
    cmd = [sys.executable, str(ROOT / "prepare.py"), *args] if code is None else [sys.executable, "-c", code]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return r.returncode, r.stderr


def assert_one_clear_line(rc, stderr, *needles):
    assert rc != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_inputs_give_one_clear_line(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ok".encode("utf-8") + b" na\xefve")
    (tmp_path / "short.txt").write_text("just a few words\n" * 60, encoding="utf-8")  # 1,020 chars
    (tmp_path / "a_file").write_text("x", encoding="utf-8")
    (tmp_path / "emptydir").mkdir()
    cases = [
        (["--input", "nope.txt", "--name", "x"], ["nope.txt", "not found"]),
        (["--input", "empty.txt", "--name", "x"], ["empty"]),
        (["--input", "emptydir", "--name", "x"], ["no files"]),
        (["--input", "latin1.txt", "--name", "x", "--tokenizer", "char"], ["latin1.txt", "UTF-8", "offset 11 (line 1)"]),
        (["--input", "short.txt", "--name", "x", "--tokenizer", "char"], ["val split", "--val_fraction", "--block_size"]),
        (["--input", "short.txt", "--name", "x", "--tokenizer", "char", "--block_size", "200",
          "--val_fraction", "0.9"], ["train split", "smaller --val_fraction"]),
        (["--input", "short.txt", "--name", "x", "--tokenizer", "char", "--block_size", "600"],
         ["only 1,020 tokens", "--block_size"]),
        (["--input", "short.txt", "--name", "x", "--data_dir", "a_file/data"], ["cannot write", "a_file"]),
        (["--input", "short.txt", "--name", "x", "--tokenizer", "gpt5"], ["unknown tokenizer", "cl100k_base"]),
        ([], ["--input", "shakespeare_char"]),
        (["tinystories"], ["unknown dataset"]),
        (["--input", "short.txt"], ["--name"]),
        (["--input", "short.txt", "--name", "x", "--val_fraction", "1.5"], ["--val_fraction"]),
    ]
    for args, needles in cases:
        assert_one_clear_line(*cli(tmp_path, *args), *needles)
        assert not (tmp_path / "data").exists() or os.listdir(tmp_path / "data") == [], args  # nothing written


def test_offline_without_local_copy_says_where_to_put_it(tmp_path):
    code = ("import prepare; from errors import run_main; "
            "prepare.SHAKESPEARE_URL = 'http://127.0.0.1:9/input.txt'; run_main(prepare.main, ['shakespeare_char'])")
    rc, stderr = cli(tmp_path, code=code)
    assert_one_clear_line(rc, stderr, "could not download", "data/shakespeare_char/input.txt", "--input PATH")
    assert not (tmp_path / "data").exists()  # the folder it made for nothing is gone again


def test_download_failure_in_process(monkeypatch, tmp_path):
    monkeypatch.setattr(prepare, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    with pytest.raises(UserError, match="--input PATH"):
        run_prepare(tmp_path / "data", "shakespeare")


def test_a_run_keeps_reading_the_data_it_opened_while_prepare_replaces_it(tmp_path, monkeypatch):
    """prepare.py swaps a new folder in while a train.py reads the old one: the run's batches
    stay the old data's (never ids of another vocabulary), and the next run reads the new data.
    On Windows, where a folder with an open file cannot be renamed, prepare.py says why in one line."""
    import torch
    from dataset import Dataset
    (tmp_path / "a.txt").write_text("abcab" * 400, encoding="utf-8")
    (tmp_path / "b.txt").write_text("xyz!?" * 400, encoding="utf-8")
    data = tmp_path / "data"
    run_prepare(data, "--input", str(tmp_path / "a.txt"), "--name", "d", "--tokenizer", "char", "--block_size", "8")
    running = Dataset(str(data), "d")
    draw = lambda ds: ds.get_batch("train", 4, 8, torch.Generator().manual_seed(0), "cpu")[0]  # noqa: E731
    before = draw(running)
    run_prepare(data, "--input", str(tmp_path / "b.txt"), "--name", "d", "--tokenizer", "char", "--block_size", "8")
    assert torch.equal(draw(running), before)  # the old data, whole
    assert Dataset(str(data), "d").meta["chars"] == list("!?xyz")  # a new run reads the new data

    real_rename = os.rename

    def windows_rename(src, dst):
        if Path(src) == data / "d":
            raise PermissionError(13, "The process cannot access the file because it is being used")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", windows_rename)
    with pytest.raises(UserError, match="a program has a file in it open"):
        prepare.main(["--data_dir", str(data), "--input", str(tmp_path / "a.txt"), "--name", "d",
                      "--tokenizer", "char", "--block_size", "8"])
    assert Dataset(str(data), "d").meta["chars"] == list("!?xyz")  # untouched
    assert sorted(p.name for p in data.iterdir()) == ["d"]  # no temp or old folder left


# ---------------------------------------------------------------- line ends, Ctrl-C, --help

LF_LINES = ["First Citizen:", "Before we proceed any further, hear me speak.", "", "All:", "Speak, speak.",
            "", "", "Première ligne, grüße 😀", "You are all resolved rather to die than to famish?"] * 12


@pytest.mark.parametrize("flags", [["--tokenizer", "char"], ["--tokenizer", "gpt2"],
                                   ["--tokenizer", "char", "--documents", "line"],
                                   ["--tokenizer", "gpt2", "--documents", "blank"],
                                   # the trainer's input is cut where 7-byte reads end, inside lines
                                   # too: whole-file reads, so that LF and CRLF are cut alike
                                   ["--tokenizer", "bpe:300", "--chunk_size", "4096"]])
def test_crlf_cr_and_bom_files_give_the_dataset_of_their_lf_copy(tmp_path, flags):
    """A file saved on Windows (CRLF, a byte-order mark) or an old Mac (CR) is read as text,
    in every mode: the same ids and vocabulary as its LF copy, no '\\r' or '\\ufeff' learned.
    Reads of 7 bytes cut many a "\\r\\n" in two."""
    lf = "\n".join(LF_LINES) + "\n"
    variants = {"lf": lf.encode(), "crlf": ("\ufeff" + lf.replace("\n", "\r\n")).encode(),
                "cr": lf.replace("\n", "\r").encode()}
    for name, data in variants.items():
        (tmp_path / f"{name}.txt").write_bytes(data)
        run_prepare(tmp_path / "data", "--input", str(tmp_path / f"{name}.txt"), "--name", name,
                    "--chunk_size", "7", *flags, "--block_size", "8", "--num_workers", "1")
    meta, train, val = load(tmp_path / "data", "lf")
    for name in ("crlf", "cr"):
        other_meta, other_train, other_val = load(tmp_path / "data", name)
        assert np.array_equal(train, other_train) and np.array_equal(val, other_val), name
        assert other_meta.get("chars") == meta.get("chars") and other_meta.get("bpe") == meta.get("bpe")
    if "chars" in meta:
        assert "\r" not in meta["chars"] and "\ufeff" not in meta["chars"]


def test_crlf_cr_and_bom_jsonl_give_the_records_of_their_lf_copy(tmp_path):
    records = [json.dumps({"prompt": f"question {i}?", "response": f"answer {i}."}) for i in range(40)]
    lf = "\n".join(records) + "\n"
    (tmp_path / "lf.jsonl").write_text(lf, encoding="utf-8", newline="")
    (tmp_path / "crlf.jsonl").write_text("\ufeff" + lf.replace("\n", "\r\n"), encoding="utf-8", newline="")
    (tmp_path / "cr.jsonl").write_text(lf.replace("\n", "\r"), encoding="utf-8", newline="")
    for name in ("lf", "crlf", "cr"):
        run_prepare(tmp_path / "data", "--input", str(tmp_path / f"{name}.jsonl"), "--name", name,
                    "--tokenizer", "char", "--block_size", "8")
    meta, train, val = load(tmp_path / "data", "lf")
    for name in ("crlf", "cr"):
        other_meta, other_train, other_val = load(tmp_path / "data", name)
        assert np.array_equal(train, other_train) and np.array_equal(val, other_val), name
        assert other_meta["chars"] == meta["chars"] and other_meta["train_documents"] == 36
    (tmp_path / "bad.jsonl").write_text(lf.replace("\n", "\r").replace("answer 3.", 'answer 3.""'),
                                        encoding="utf-8", newline="")
    with pytest.raises(UserError, match=r"bad.jsonl:4: not valid JSON"):  # lines counted at each "\r"
        run_prepare(tmp_path / "data", "--input", str(tmp_path / "bad.jsonl"), "--name", "bad")


def test_ctrl_c_stops_every_process_with_one_line_and_keeps_the_old_dataset(tmp_path):
    """Ctrl-C reaches the whole process group, encoder workers included: they ignore it, the
    parent says "interrupted" (no worker traceback, no hang on a worker that died holding the
    pool's queue), and data/<name>/ stays the old dataset with no temporary folder left.
    Char-level: the workers encode faster than the parent reads, so they wait for work."""
    import signal
    import time
    data = tmp_path / "data"
    (tmp_path / "old.txt").write_text("an old small dataset\n" * 100, encoding="utf-8")
    run_prepare(data, "--input", str(tmp_path / "old.txt"), "--name", "d", "--tokenizer", "char", "--block_size", "8")
    old = {p.name: p.read_bytes() for p in (data / "d").iterdir()}
    big = tmp_path / "big.txt"
    big.write_text(SHAKESPEARE.read_text(encoding="utf-8") * 12, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--input", str(big), "--name", "d",
                             "--data_dir", str(data), "--tokenizer", "char", "--num_workers", "4",
                             "--chunk_size", "65536"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    while not proc.stdout.readline().startswith("vocab size"):  # pass 2, with its workers, starts next
        pass
    time.sleep(0.3)
    assert proc.poll() is None, "prepare.py finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    try:
        stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("prepare.py hung after Ctrl-C")
    assert proc.returncode == 130 and "wrote" not in stdout
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert sorted(p.name for p in data.iterdir()) == ["d"]  # no temp folder, no lock left
    assert {p.name: p.read_bytes() for p in (data / "d").iterdir()} == old


def test_help_shows_no_none_defaults(capsys):
    with pytest.raises(SystemExit):
        prepare.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "(default: the named dataset)" in text and "(default: file)" in text


@pytest.mark.parametrize("mode", ["text", "line", "jsonl"])
def test_a_trained_vocabulary_learns_nothing_from_the_val_split(tmp_path, shakespeare_text, mode):
    """--tokenizer=bpe:N is trained on the train split only: a string found nowhere but in val
    ("qxzq", hundreds of times over) gets no token of two or more of its characters, in plain
    text (val is the tail), in documents mode and for JSONL records (val: the last documents)."""
    lines = [line for line in shakespeare_text[:20_000].split("\n") if line.strip()]
    unseen = ["qxzq" * 12] * 15  # 15 lines: all in val (the last 10% of the documents, or of the text)
    assert "qx" not in shakespeare_text[:20_000] and len(unseen) < 0.1 * len(lines)
    if mode == "jsonl":
        src = tmp_path / "records.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines + unseen), encoding="utf-8")
        flags = ["--shuffle=false"]
    else:
        src = tmp_path / "input.txt"
        src.write_text("\n".join(lines + unseen) + "\n", encoding="utf-8")
        flags = ["--documents=line", "--shuffle=false"] if mode == "line" else []
        assert len("\n".join(unseen)) < 0.1 * len(src.read_text())  # all of it in the val tail
    run_prepare(tmp_path / "data", "--input", str(src), "--name", "d", "--tokenizer", "bpe:300",
                "--block_size", "8", "--num_workers", "1", *flags)
    meta, train, val = load(tmp_path / "data", "d")
    tok = Tokenizer.from_description(meta)
    assert tok.vocab_size == 300
    assert "qxzq" in tok.decode(val) and "qxzq" not in tok.decode(train)
    pieces = {"qxzqqxzq"[i:j] for i in range(8) for j in range(i + 2, 9)}
    learned = [tok.encoding.decode_single_token_bytes(i).decode("utf-8", "replace") for i in range(256, tok.eot_id)]
    assert not pieces & set(learned), sorted(pieces & set(learned))


def test_control_characters_of_the_vocabulary_are_shown_escaped(tmp_path, capsys):
    """The char vocabulary's line prints as nanoGPT's (its newline raw), but a NUL or an escape
    character of the text reaches the terminal as \\x00, \\x1b (they went out raw)."""
    src = tmp_path / "input.txt"
    src.write_text("to be\x00or not\x1b[31m to be, é\n" * 200, encoding="utf-8")
    run_prepare(tmp_path / "data", "--input", str(src), "--name", "c", "--tokenizer", "char", "--block_size", "8")
    out = capsys.readouterr().out
    line = out[out.index("all the unique characters:"):out.index("vocab size")]
    assert "\x00" not in line and "\x1b" not in line
    assert line == "all the unique characters: \\x00\n\\x1b ,13[bemnorté\n"


def test_windows_many_core_machines_get_at_most_61_workers(tmp_path, monkeypatch):
    """Python's process pools refuse more than 61 workers on Windows: a 64-thread PC takes 61 by
    default, and an explicit larger --num_workers is one line, not the pool's traceback."""
    monkeypatch.setattr(prepare, "MAX_WORKERS", 61)
    monkeypatch.setattr(prepare.os, "cpu_count", lambda: 64)
    args = prepare.parse_args(["--input", "x.txt", "--name", "x"])
    assert args.num_workers == 61
    prepare.check_args(args)
    with pytest.raises(UserError, match="--num_workers=64: .* at most 61 workers on Windows; pass --num_workers=61"):
        prepare.check_args(prepare.parse_args(["--input", "x.txt", "--name", "x", "--num_workers=64"]))


def test_a_spawned_worker_ignores_ctrl_c_from_its_first_import():
    """macOS and Windows start workers by spawning, which imports prepare.py again as __mp_main__:
    Ctrl-C (the parent handles it) is ignored from its first line, before numpy's import, so a
    worker still importing prints no traceback."""
    import signal

    import errors
    before = signal.getsignal(signal.SIGINT)
    try:
        errors.starting("__mp_main__")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    lines = (ROOT / "prepare.py").read_text(encoding="utf-8").split('"""', 2)[2].lstrip().splitlines()
    assert lines[0] == "import errors" and lines[1].startswith("errors.starting(__name__)")


def test_a_folder_is_read_in_the_same_order_on_every_os(tmp_path, monkeypatch):
    """Windows' paths compare without case, Linux's with it: files are ordered by their names'
    parts as Linux orders them (capitals first) on every OS, so the dataset and its val split are
    the same wherever the folder is prepared."""
    folder = tmp_path / "books"
    for name in ("Zebra.txt", "apple.txt", "Chapter 10.txt", "chapter 2.txt", "b/a.txt", "b-c.txt"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name, encoding="utf-8")
    linux = ["Chapter 10.txt", "Zebra.txt", "apple.txt", "b/a.txt", "b-c.txt", "chapter 2.txt"]
    assert [p.relative_to(folder).as_posix() for p in prepare.list_files([str(folder)])] == linux

    class CaselessPath(type(folder)):  # paths that sort as WindowsPath does
        def __lt__(self, other):
            return str(self).lower() < str(other).lower()

    monkeypatch.setattr(prepare, "Path", CaselessPath)
    assert [p.relative_to(folder).as_posix() for p in prepare.list_files([str(folder)])] == linux


def test_more_text_prepared_with_a_runs_vocabulary_finetunes_that_run(tmp_path, shakespeare_text):
    """A bpe:N (or char) model's vocabulary came from its own text: --tokenizer=a dataset's or a
    run's folder prepares more text with it, which --init_from that run then trains on (another
    bpe:N of the same size would be other ids). A character the vocabulary lacks, or a documents
    mode its boundary token does not fit, is one line."""
    import train
    from conftest import TINY
    data = tmp_path / "data"
    (tmp_path / "a.txt").write_text(shakespeare_text[:40_000], encoding="utf-8")
    (tmp_path / "b.txt").write_text(shakespeare_text[40_000:70_000], encoding="utf-8")
    common = ["--block_size", "32", "--num_workers", "1", "--data_dir", str(data)]
    prepare.main(["--input", str(tmp_path / "a.txt"), "--name", "a", "--tokenizer", "bpe:300", *common])
    train.main([f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", *TINY, "--dataset=a", "--max_iters=2"])
    for source in (str(tmp_path / "run"), str(data / "a"), str(data / "a" / "meta.json")):
        prepare.main(["--input", str(tmp_path / "b.txt"), "--name", "b", "--tokenizer", source, *common])
        a, b = (json.loads((data / n / "meta.json").read_text(encoding="utf-8")) for n in ("a", "b"))
        assert b["bpe"] == a["bpe"] and b["vocab_size"] == a["vocab_size"] == 300, source
    ids = np.fromfile(data / "b" / "train.bin", dtype=np.uint16)
    decoded = Tokenizer.from_description(a).decode(ids)  # train.bin: the text but its last tenth (val)
    assert len(decoded) > 20_000 and shakespeare_text[40_000:70_000].startswith(decoded)
    train.main([f"--data_dir={data}", f"--out_dir={tmp_path / 'more'}", *TINY, "--dataset=b",
                f"--init_from={tmp_path / 'run'}", "--max_iters=2"])
    prepare.main(["--input", str(tmp_path / "b.txt"), "--name", "other", "--tokenizer", "bpe:300", *common])
    with pytest.raises(UserError, match=r"both are trained BPE vocabularies, but different ones; .*--tokenizer="):
        train.main([f"--data_dir={data}", f"--out_dir={tmp_path / 'x'}", *TINY, "--dataset=other",
                    f"--init_from={tmp_path / 'run'}", "--max_iters=2"])
    # char-level: the characters, and the boundary token, must be the vocabulary's
    (tmp_path / "all.txt").write_text(shakespeare_text, encoding="utf-8")
    prepare.main(["--input", str(tmp_path / "all.txt"), "--name", "c", "--tokenizer", "char", *common])
    (tmp_path / "new.txt").write_text(shakespeare_text[40_000:70_000] + "caf\u00e9 \u00e0 la carte\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"the text has 2 character\(s\) the vocabulary of .*c lacks: 'à', 'é'"):
        prepare.main(["--input", str(tmp_path / "new.txt"), "--name", "d", "--tokenizer", str(data / "c"), *common])
    with pytest.raises(UserError, match="this text's documents start with a boundary token, but the vocabulary of"):
        prepare.main(["--input", str(tmp_path / "b.txt"), "--name", "d", "--tokenizer", str(data / "c"),
                      "--documents", "line", *common])
    with pytest.raises(UserError, match="no prepared dataset \\(meta.json\\) or run \\(ckpt.pt\\) there"):
        prepare.main(["--input", str(tmp_path / "b.txt"), "--name", "d", "--tokenizer", str(tmp_path / "none"), *common])
    (tmp_path / "list.json").write_text("[1, 2]", encoding="utf-8")  # a .json that is no meta.json
    with pytest.raises(UserError, match=r"^--tokenizer=.*list.json: no prepared dataset"):
        prepare.main(["--input", str(tmp_path / "b.txt"), "--name", "d", "--tokenizer", str(tmp_path / "list.json"),
                      *common])
    (tmp_path / "meta.json").write_text('{"tokenizer": "char"}', encoding="utf-8")  # a damaged one: which flag
    with pytest.raises(UserError, match=r"^--tokenizer=.*meta.json: char tokenizer description has no 'chars'"):
        prepare.main(["--input", str(tmp_path / "b.txt"), "--name", "d", "--tokenizer", str(tmp_path / "meta.json"),
                      *common])
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match=r"is a Hugging Face model's folder: for a GPT-2 .* --tokenizer gpt2"):
        prepare.main(["--input", str(tmp_path / "b.txt"), "--name", "d", "--tokenizer", str(tmp_path / "hf"), *common])
    with pytest.raises(UserError, match=r"^unknown tokenizer 'a'; for the vocabulary of the dataset of that name, "
                                        r"pass its folder: --tokenizer=.*a$"):
        prepare.main(["--input", str(tmp_path / "b.txt"), "--name", "d", "--tokenizer", "a", *common])
    assert not (data / "d").exists()


def test_long_lines_reach_the_bpe_trainer_in_pieces():
    """The trainer's time grows with the square of a line's length (a 340,000-character line:
    half a minute to half an hour, Ctrl-C unanswered): lines over 1,000 characters are cut, at a
    space in their second half where there is one; shorter texts pass as they are."""
    short = "to be or not to be\nthat is the question\n"
    assert list(prepare.cut_long_lines([short])) == [short]
    words = " ".join(f"w{i:03d}" for i in range(600))  # 2,999 characters
    cut, = prepare.cut_long_lines([f"a\n{words}\nb"], limit=1000)
    lines = cut.split("\n")
    assert lines[0] == "a" and lines[-1] == "b" and all(len(line) <= 1000 for line in lines)
    assert "".join(lines[1:-1]) == words and all(line.startswith(" ") for line in lines[2:-1])  # cut before a space
    assert list(prepare.cut_long_lines(["x" * 2500], limit=1000)) == ["\n".join(["x" * 1000, "x" * 1000, "x" * 500])]


def test_a_vocabulary_too_large_for_its_text_is_said(tmp_path, capsys):
    """bpe:N with N near the text's token count: most tokens occur a few times or never."""
    (tmp_path / "a.txt").write_text("".join(f"line {i} of a tiny text\n" for i in range(300)), encoding="utf-8")
    run_prepare(tmp_path, "--input", str(tmp_path / "a.txt"), "--name", "big", "--tokenizer", "bpe:500",
                "--block_size", "8", "--num_workers", "1")
    assert "note: a vocabulary of 500 tokens for " in capsys.readouterr().err
    run_prepare(tmp_path, "--input", str(tmp_path / "a.txt"), "--name", "small", "--tokenizer", "bpe:260",
                "--block_size", "8", "--num_workers", "1")
    assert "note: a vocabulary" not in capsys.readouterr().err


def test_a_tokenizers_name_is_not_a_folder_of_that_name_but_a_path_is(tmp_path, monkeypatch):
    """--tokenizer=gpt2 (char, bpe:N, a tiktoken encoding) names a tokenizer even where the current
    folder holds a folder of that name; a path (a slash either way, or an existing folder) names a
    dataset's or a run's vocabulary, one that is missing too (then said in one line)."""
    monkeypatch.chdir(tmp_path)
    for name in ("gpt2", "char", "bpe:300", "cl100k_base", "out"):
        (tmp_path / name).mkdir()
    assert not any(prepare.names_a_vocabulary(n) for n in ("gpt2", "char", "bpe:300", "cl100k_base", "nothing"))
    assert all(prepare.names_a_vocabulary(n) for n in ("out", "data/none", "runs\\none"))


def test_a_vocabulary_is_read_from_a_runs_ckpt_pt_and_other_files_are_one_line(tiny_data, tmp_path):
    import train
    from conftest import TINY

    train.main([f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'run'}", *TINY, "--max_iters=1"])
    from_file = prepare.vocabulary_of(str(tmp_path / "run" / "ckpt.pt"))
    assert from_file.describe() == prepare.vocabulary_of(str(tmp_path / "run")).describe()
    assert from_file.chars is not None
    (tmp_path / "a.txt").write_text("not a vocabulary\n", encoding="utf-8")
    with pytest.raises(UserError, match="no prepared dataset \\(meta.json\\) or run \\(ckpt.pt\\) there"):
        prepare.vocabulary_of(str(tmp_path / "a.txt"))
    (tmp_path / "meta.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="cannot read its vocabulary \\(JSONDecodeError"):
        prepare.vocabulary_of(str(tmp_path / "meta.json"))


def test_a_vocabularys_boundary_token_must_fit_the_texts_documents_mode():
    plain, docs = Tokenizer.char_from_text("ab\n"), Tokenizer.char_from_text("ab\n", documents="line")
    with pytest.raises(UserError, match="has none \\(it was prepared as plain text\\); prepare this text as plain text"):
        prepare.check_vocabulary(plain, "data/a", "ab", "line")
    with pytest.raises(UserError, match="has none \\(it was prepared as plain text\\); records need one"):
        prepare.check_vocabulary(plain, "data/a", "ab", prepare.JSONL)
    with pytest.raises(UserError, match="^the vocabulary of data/d has a document-boundary token"):
        prepare.check_vocabulary(docs, "data/d", "ab", None)
    prepare.check_vocabulary(docs, "data/d", "ab", "blank")  # this text's own documents mode is recorded
    assert docs.documents == "blank" and docs.describe()["documents"] == "blank"


def test_a_long_line_without_a_late_space_is_cut_at_the_limit_and_one_of_twice_the_limit_in_two():
    cut, = prepare.cut_long_lines(["a " + "x" * 2000], limit=1000)  # the only space is in the first half
    assert cut.split("\n") == ["a " + "x" * 998, "x" * 1000, "xx"]
    cut, = prepare.cut_long_lines(["x" * 2000], limit=1000)
    assert cut.split("\n") == ["x" * 1000, "x" * 1000]  # no empty piece after the last


def test_the_bpe_trainer_reads_long_lines_cut(monkeypatch):
    seen = []
    original = prepare.cut_long_lines

    def spy(texts, *args, **kwargs):
        for text in original(texts, *args, **kwargs):
            seen.append(text)
            yield text
    monkeypatch.setattr(prepare, "cut_long_lines", spy)
    prepare.train_bpe(["to be or not to be " * 100], 260, None)
    assert seen and all(len(line) <= prepare.BPE_PIECE_CHARS for line in seen[0].split("\n"))


def test_windows_takes_at_most_61_workers_and_other_systems_have_no_such_limit(monkeypatch):
    import importlib.util
    assert prepare.MAX_WORKERS is None  # (this is not Windows: no limit)
    monkeypatch.setattr(sys, "platform", "win32")
    spec = importlib.util.spec_from_file_location("prepare_on_windows", ROOT / "prepare.py")
    on_windows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(on_windows)
    assert on_windows.MAX_WORKERS == 61


def test_the_too_large_vocabulary_note_is_for_trained_vocabularies_only(tmp_path, capsys):
    """A tiny text under gpt2's 50,257 tokens is no vocabulary chosen too large for it."""
    (tmp_path / "a.txt").write_text("".join(f"line {i} of a tiny text\n" for i in range(300)), encoding="utf-8")
    run_prepare(tmp_path, "--input", str(tmp_path / "a.txt"), "--name", "g", "--tokenizer", "gpt2",
                "--block_size", "8", "--num_workers", "1")
    assert "note: a vocabulary" not in capsys.readouterr().err


def test_what_looks_binary_a_known_start_or_a_nul():
    assert prepare.looks_binary(b"GIF89a\x01\x02\xff")  # an image's start, no NUL in its first bytes
    assert prepare.looks_binary(b"\xff\xfe\x01abc\x00def")  # an unknown format with a NUL
    assert not prepare.looks_binary("caf\u00e9".encode("latin-1"))
