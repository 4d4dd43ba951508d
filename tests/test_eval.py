"""eval.py: loss, perplexity and bits per byte over a split or a text file, per-line scores, errors."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import checkpoint
import eval as evaluate  # the stage script (eval.py)
from conftest import ROOT, write_char_dataset
from errors import UserError
from model import GPT, GPTConfig
from tokenizer import Tokenizer

BLOCK = 16
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. Café!\n" * 6
CHARS = sorted(set(TEXT))


def save_model(out_dir, tokenizer: Tokenizer, seed: int = 0, dataset: str = "tiny", data_dir: str = "",
               zero: bool = False, vocab_size: int | None = None) -> str:
    """A random tiny GPT (all weights zero with zero: every prediction uniform) as a checkpoint."""
    torch.manual_seed(seed)
    args = dict(block_size=BLOCK, vocab_size=vocab_size or tokenizer.vocab_size, n_layer=2, n_head=2,
                n_embd=16, dropout=0.0, bias=True, bigram=True)
    model = GPT(GPTConfig(**args))
    if zero:
        for p in model.parameters():
            torch.nn.init.zeros_(p)
    checkpoint.save({"model": model.state_dict(), "model_args": args, "optimizer": {}, "iter_num": 0,
                     "best_val_loss": 9.9, "config": {"dataset": dataset, "data_dir": data_dir},
                     "tokenizer": tokenizer.describe()}, out_dir / "ckpt.pt")
    return str(out_dir)


def model_of(out_dir) -> GPT:
    ckpt = checkpoint.load(out_dir)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def run_json(argv, capsys) -> dict:
    evaluate.main([*argv, "--json", "--device=cpu"])
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def char_tok():
    return Tokenizer.char_from_text(TEXT)


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory, char_tok):
    return save_model(tmp_path_factory.mktemp("char"), char_tok)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_windows_score_every_token_once():
    for n in (2, 3, 16, 17, 18, 40, 100):
        for stride in (1, 5, 16):
            scored = []
            for start, end, scored_from in evaluate.windows(n, BLOCK, stride):
                assert end - start <= BLOCK and start <= scored_from < end
                scored += range(scored_from, end)
            assert scored == list(range(n - 1)), (n, stride)


def test_bits_per_byte_by_hand(char_dir, char_tok, text_file, capsys):
    """A text shorter than a window: one forward pass gives every token's loss."""
    short = "Speak. Café!\n"
    text_file.write_text(short, encoding="utf-8")
    ids = torch.tensor(char_tok.encode(short))
    logits, _ = model_of(char_dir)(ids[None, :-1], ids[None, 1:])
    nats = F.cross_entropy(logits[0], ids[1:], reduction="sum").item()
    scored_bytes = len(short[1:].encode("utf-8"))  # the first character is not predicted; é is 2 bytes
    r = run_json([f"--out_dir={char_dir}", f"--input={text_file}"], capsys)
    assert r["tokens"] == len(short) - 1 and r["bytes"] == scored_bytes == r["chars"] + 1
    assert r["loss"] == pytest.approx(nats / (len(short) - 1), rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
    assert r["bits_per_byte"] == pytest.approx(nats / math.log(2) / scored_bytes, rel=1e-5)
    assert r["bits_per_char"] == pytest.approx(nats / math.log(2) / (len(short) - 1), rel=1e-5)


def test_whole_split_is_the_mean_over_windows(tmp_path, capsys):
    """Non-overlapping windows of block_size tokens, every token but the first scored once; the
    loss is the token-weighted mean of the windows' losses, as the model computes them."""
    text = TEXT * 3
    data = write_char_dataset(tmp_path / "data", text, name="tiny", val_fraction=0.5).parent
    tok = Tokenizer.char_from_text(text)
    out = save_model(tmp_path / "out", tok, data_dir=str(data))
    val = torch.from_numpy(np.fromfile(data / "tiny" / "val.bin", dtype=np.uint16).astype(np.int64))
    model, total = model_of(out), 0.0
    for start in range(0, len(val) - 1, BLOCK):
        x, y = val[start:start + BLOCK], val[start + 1:start + BLOCK + 1]
        _, loss = model(x[None, :len(y)], y[None])
        total += loss.item() * len(y)
    r = run_json([f"--out_dir={out}"], capsys)
    assert r["tokens"] == len(val) - 1
    assert r["loss"] == pytest.approx(total / (len(val) - 1), rel=1e-5)
    # a shorter stride gives more context, never changes what is scored
    strided = run_json([f"--out_dir={out}", "--stride=4", "--batch_size=3"], capsys)
    assert strided["tokens"] == r["tokens"] and strided["bytes"] == r["bytes"]
    # by hand: windows of BLOCK inputs that move 4 tokens, each scoring the predictions after the
    # last window's end, so every token after the first window has at least BLOCK - 4 of context
    n, nats, scored_to = len(val), 0.0, 0
    for start in range(0, n - 1, 4):
        end = min(start + BLOCK, n - 1)
        logits, _ = model(val[None, start:end], val[None, start + 1:end + 1])
        nats += F.cross_entropy(logits[0, scored_to - start:], val[scored_to + 1:end + 1], reduction="sum").item()
        scored_to = end
        if end == n - 1:
            break
    assert strided["loss"] == pytest.approx(nats / (n - 1), rel=1e-5)
    assert abs(strided["loss"] - r["loss"]) > 1e-4


def test_bits_per_byte_compares_tokenizers(tmp_path, text_file, capsys):
    """Char-level and BPE models of the same text: the same bytes, and a model that predicts
    uniformly gives tokens * log2(vocab) / bytes, whatever its tokenizer."""
    ranks = [bytes([b]) for b in range(256)] + [b"e ", b"pe", b"pea", b"peak", b"Sp"]
    results = {}
    for name, tok in (("char", Tokenizer.char_from_text(TEXT)), ("bpe", Tokenizer.bpe_from_ranks(ranks))):
        out = save_model(tmp_path / name, tok, zero=True)
        r = results[name] = run_json([f"--out_dir={out}", f"--input={text_file}"], capsys)
        ids = tok.encode(TEXT)
        assert r["tokens"] == len(ids) - 1
        assert r["bytes"] == len(tok.decode_bytes(ids[1:]))
        assert r["loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-6)
        assert r["bits_per_byte"] == pytest.approx(r["tokens"] * math.log2(tok.vocab_size) / r["bytes"], rel=1e-6)
    assert results["bpe"]["tokens"] < results["char"]["tokens"]
    # the first token is the context of both: its bytes are the only ones counted apart
    assert results["char"]["bytes"] == len(TEXT.encode("utf-8")) - 1
    assert results["bpe"]["bytes"] == len(TEXT.encode("utf-8")) - len(ranks[int(Tokenizer.bpe_from_ranks(ranks).encode(TEXT)[0])])


def test_per_line_scores_each_line_on_its_own(char_dir, char_tok, text_file, tmp_path, capsys):
    out = tmp_path / "lines.jsonl"
    r = run_json([f"--out_dir={char_dir}", f"--input={text_file}", f"--per_line={out}"], capsys)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    lines = [(n + 1, line) for n, line in enumerate(TEXT.split("\n")) if line.strip()]
    assert [(rec["line"], rec["text"]) for rec in records] == lines
    assert r["per_line"]["lines"] == len(lines)
    model = model_of(char_dir)
    short = [rec for rec in records if len(rec["text"]) + 1 <= BLOCK]  # one window; longer lines slide
    assert short and len(short) < len(records)
    for rec in short[:4]:  # after a line end, up to and including the line's own end
        ids = torch.tensor(char_tok.encode("\n" + rec["text"] + "\n"))
        logits, _ = model(ids[None, :-1], ids[None, 1:])
        nats = F.cross_entropy(logits[0], ids[1:], reduction="sum").item()
        assert rec["tokens"] == len(rec["text"]) + 1
        assert rec["bytes"] == len((rec["text"] + "\n").encode("utf-8"))
        assert rec["logprob"] == pytest.approx(-nats, rel=1e-5)
        assert rec["bits_per_byte"] == pytest.approx(nats / math.log(2) / rec["bytes"], rel=1e-5)
    tsv = tmp_path / "lines.tsv"
    run_json([f"--out_dir={char_dir}", f"--input={text_file}", f"--per_line={tsv}"], capsys)
    rows = tsv.read_text(encoding="utf-8").splitlines()
    assert rows[0].split("\t") == ["line", "tokens", "bytes", "loss", "bits_per_byte", "logprob", "text"]
    assert len(rows) == len(lines) + 1 and rows[1].split("\t")[-1] == lines[0][1]
    # a file whose last line has no line end: that line is scored up to its last character, so the
    # lines' bytes add up to the file's (no line end predicted that is not there)
    unended = tmp_path / "unended.txt"
    unended.write_text("All: hi\nFirst: ho", encoding="utf-8")
    run_json([f"--out_dir={char_dir}", f"--input={unended}", f"--per_line={out}"], capsys)
    first, last = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert (first["tokens"], first["bytes"]) == (8, 8) and (last["tokens"], last["bytes"]) == (9, 9)


@pytest.mark.parametrize("documents", ["line", "jsonl"])
def test_documents_model(tmp_path, capsys, documents):
    """A documents model (of --documents=line, or of JSONL records): each line a document after
    its boundary, scored up to the closing one; the boundary stands for no bytes."""
    docs = ["jab cross hook", "jab jab cross", "hook uppercut"]
    tok = Tokenizer.char_from_text("".join(docs), documents=documents)
    out = save_model(tmp_path / "out", tok)
    path = tmp_path / "combos.txt"
    path.write_text("\n".join(docs) + "\n\n", encoding="utf-8")
    per_line = tmp_path / "scores.jsonl"
    r = run_json([f"--out_dir={out}", f"--input={path}", f"--per_line={per_line}"], capsys)
    assert r["tokens"] == sum(len(d) + 1 for d in docs)  # [eot] doc [eot] doc [eot] doc [eot]
    assert r["bytes"] == sum(len(d) for d in docs)
    records = [json.loads(line) for line in per_line.read_text(encoding="utf-8").splitlines()]
    assert [(rec["line"], rec["text"], rec["tokens"]) for rec in records] == [(i + 1, d, len(d) + 1) for i, d in enumerate(docs)]
    # documents are scored apart: the first one's loss is the same as in the whole text
    ids = torch.tensor([tok.eot_id, *tok.encode(docs[0]), tok.eot_id])
    logits, _ = model_of(out)(ids[None, :-1], ids[None, 1:])
    assert records[0]["logprob"] == pytest.approx(-F.cross_entropy(logits[0], ids[1:], reduction="sum").item(), rel=1e-5)
    if documents == "jsonl":  # records in JSON: not plain text, one line that says what to do
        (tmp_path / "records.jsonl").write_text('{"text": "jab"}\n', encoding="utf-8")
        with pytest.raises(UserError, match="scores plain text, one document per line"):
            evaluate.main([f"--out_dir={out}", f"--input={tmp_path / 'records.jsonl'}"])


def test_document_windows_start_at_documents_and_score_every_token_once():
    eot = 9
    ids = np.array([eot, 1, 2, 3, eot, 4, 5, eot, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, eot])
    starts = set(np.flatnonzero(ids == eot).tolist())
    for block in (2, 3, 4, 6, 16, 40):
        plan, scored = evaluate.document_windows(ids, eot, block), []
        for start, end, scored_from in plan:
            assert end - start <= block and start <= scored_from < end
            # a window starts at a document, or block tokens on into a long one (train.py's rows)
            doc = max(d for d in starts if d <= start)
            assert start in starts or (start - doc) % block == 0, (block, start)
            scored += range(scored_from, end)
        assert scored == list(range(len(ids) - 1)), block


def test_a_documents_split_scores_each_document_with_its_own_context(tmp_path, capsys):
    """Records shorter than the block, in a row: the whole-text loss is the sum of each record
    scored alone (per_line), not of windows that start mid-record, where a record's tokens had
    no beginning and positions from the wrong place."""
    docs = ["jab cross hook", "jab jab cross", "hook uppercut", "cross", "jab hook jab cross hook", "jab"] * 3
    tok = Tokenizer.char_from_text("".join(docs), documents="line")
    out = save_model(tmp_path / "out", tok, seed=3)
    path = tmp_path / "combos.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    per_line = tmp_path / "scores.jsonl"
    r = run_json([f"--out_dir={out}", f"--input={path}", f"--per_line={per_line}"], capsys)
    records = [json.loads(line) for line in per_line.read_text(encoding="utf-8").splitlines()]
    assert r["logprob"] == pytest.approx(sum(rec["logprob"] for rec in records), rel=1e-5)
    with pytest.raises(UserError, match="--stride is for plain text"):
        evaluate.main([f"--out_dir={out}", f"--input={path}", "--stride=4", "--device=cpu"])


def test_bad_inputs_one_clear_line(char_dir, tmp_path):
    cases = []
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ok\nCaf\xe9\n".encode("latin-1"))
    cases.append(([f"--out_dir={char_dir}", f"--input={latin1}"], "not UTF-8 text: invalid byte at offset 6 (line 2)"))
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("Speak.\nSpeak Zed 9\n", encoding="utf-8")
    cases.append(([f"--out_dir={char_dir}", f"--input={unknown}"],
                  "holds 2 character(s) the char-level model never saw: 'Z' '9' (the first on line 2); --drop_unknown"))
    cases.append(([f"--out_dir={char_dir}", f"--input={unknown}", f"--per_line={unknown}"],
                  "is the --input file itself, which the scores would replace"))
    cases.append(([f"--out_dir={char_dir}", "--drop_unknown"], "--drop_unknown drops characters of an --input file"))
    cases.append(([f"--out_dir={char_dir}", f"--input={tmp_path}"], "is a folder; eval.py scores one file"))
    cases.append(([f"--out_dir={tmp_path / 'nothing'}"], "no checkpoint at"))
    cases.append(([f"--out_dir={char_dir}", f"--input={tmp_path / 'missing.txt'}"], "not found"))
    cases.append(([f"--out_dir={char_dir}", "--per_line=x.jsonl"], "--per_line scores the lines of a text file"))
    cases.append(([f"--out_dir={char_dir}", f"--input={unknown}", f"--per_line={tmp_path / 'x.csv'}"],
                  "name the file OUT.jsonl or OUT.tsv"))
    cases.append(([f"--out_dir={char_dir}", f"--input={unknown}", "--split=val"], "pass one of them"))
    # an unwritable --per_line is named before any model loads (here there is none to load)
    cases.append(([f"--out_dir={tmp_path / 'nothing'}", f"--input={unknown}", f"--per_line={tmp_path / 'no' / 'x.jsonl'}"],
                  f"its folder {tmp_path / 'no'} does not exist"))
    (tmp_path / "dir.jsonl").mkdir()
    cases.append(([f"--out_dir={tmp_path / 'nothing'}", f"--input={unknown}", f"--per_line={tmp_path / 'dir.jsonl'}"],
                  "is a folder; name a file in it"))
    cases.append(([f"--out_dir={char_dir}", "--split=test"], "--split must be val or train"))
    short = tmp_path / "short.txt"
    short.write_text("S", encoding="utf-8")
    cases.append(([f"--out_dir={char_dir}", f"--input={short}"], "nothing to predict"))
    cases.append(([f"--out_dir={char_dir}", "--stride=99", f"--input={unknown}"], "longer than the model's block_size"))
    cases.append(([f"--out_dir={char_dir}", f"--data_dir={tmp_path}"], "dataset 'tiny' not found"))
    for argv, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            evaluate.main(argv)


def test_dataset_of_another_tokenizer_is_refused(tmp_path):
    data = write_char_dataset(tmp_path / "data", TEXT + "XYZ", name="other").parent
    with pytest.raises(UserError, match="prepared with another tokenizer"):
        evaluate.main([f"--out_dir={save_model(tmp_path / 'out', Tokenizer.char_from_text(TEXT))}",
                       f"--data_dir={data}", "--dataset=other"])


def test_cli_error_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "eval.py", f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no checkpoint at" in p.stderr


def test_int8_weights_score_close_to_float32(char_tok, text_file, tmp_path, capsys):
    """--int8 runs the blocks' matrices as int8 weight-only linears: its loss is the float32
    one's within a small fraction of what those matrices decide (a model whose blocks matter:
    its random matrices scaled up, so that zeroing the blocks' moves the loss a lot)."""
    import fast_decode
    if not fast_decode.int8_available():
        pytest.skip("this torch build has no int8 weight-only kernel")

    def saved(name, blocks_zero):
        """A random model with every matrix 10x GPT-2's init (far from uniform predictions)."""
        folder = tmp_path / name
        folder.mkdir()
        save_model(folder, char_tok, seed=1)
        ckpt = checkpoint.load(folder / "ckpt.pt")
        for key, tensor in ckpt["model"].items():
            if key.endswith("weight") and tensor.dim() == 2:
                tensor.mul_(0 if blocks_zero and key.startswith("transformer.h.") else 10)
        checkpoint.save(ckpt, folder / "ckpt.pt")
        return folder

    model = saved("blocks", blocks_zero=False)
    exact = run_json([f"--out_dir={model}", f"--input={text_file}"], capsys)
    int8 = run_json([f"--out_dir={model}", f"--input={text_file}", "--int8"], capsys)
    without = run_json([f"--out_dir={saved('without', blocks_zero=True)}", f"--input={text_file}"], capsys)
    assert int8["dtype"] == "float32 int8" and int8["tokens"] == exact["tokens"]
    decided = abs(without["loss"] - exact["loss"])
    assert decided > 0.2, (decided, exact["loss"], without["loss"])  # the blocks' matrices decide much of the loss
    assert abs(int8["loss"] - exact["loss"]) < 0.02 * decided, (int8["loss"], exact["loss"], decided)


@pytest.mark.parametrize("documents", [None, "blank"])
def test_a_crlf_cr_or_bom_file_scores_as_its_lf_copy(tmp_path, capsys, documents):
    """--input is read as prepare.py reads text: CRLF and CR line ends as "\\n", no leading
    byte-order mark. The scores, and the bytes and characters they are per, are the LF text's."""
    tokenizer = Tokenizer.char_from_text(TEXT, documents)
    out_dir = save_model(tmp_path, tokenizer)
    variants = {"lf": TEXT.encode(), "crlf": ("\ufeff" + TEXT.replace("\n", "\r\n")).encode(),
                "cr": TEXT.replace("\n", "\r").encode()}
    results = {}
    for name, data in variants.items():
        (tmp_path / f"{name}.txt").write_bytes(data)
        results[name] = r = run_json([f"--out_dir={out_dir}", f"--input={tmp_path / name}.txt",
                                      f"--per_line={tmp_path / name}.jsonl"], capsys)
        del r["text"], r["per_line"]
    if not documents:  # every character but the first is predicted: the LF text's bytes but one
        assert results["lf"]["bytes"] == len(TEXT.encode("utf-8")) - 1
    for name in ("crlf", "cr"):
        assert results[name] == results["lf"], name
        assert (tmp_path / f"{name}.jsonl").read_text(encoding="utf-8") == (tmp_path / "lf.jsonl").read_text(encoding="utf-8")


def write_dataset(data_dir, name: str, tokenizer: Tokenizer, train, val):
    """A prepared dataset of these train and val ids, its meta.json as prepare.py writes it."""
    folder = data_dir / name
    folder.mkdir(parents=True)
    np.asarray(train, dtype=np.uint16).tofile(folder / "train.bin")
    np.asarray(val, dtype=np.uint16).tofile(folder / "val.bin")
    d = tokenizer.describe()
    meta = {"version": 1, "tokenizer": d["name"], "vocab_size": d["vocab_size"], "dtype": "uint16",
            "train_tokens": len(train), "val_tokens": len(val), "eot_id": d["eot_id"], "sources": [],
            **{k: d[k] for k in ("chars", "bpe", "documents") if k in d}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return data_dir


def test_split_train_scores_the_train_split(tmp_path, capsys):
    """--split=train scores train.bin, not val.bin: the two splits differ in length here."""
    text = TEXT * 3
    data = write_char_dataset(tmp_path / "data", text, name="tiny", val_fraction=0.25)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["train_tokens"] != meta["val_tokens"]
    out = save_model(tmp_path / "out", Tokenizer.char_from_text(text), data_dir=str(data.parent))
    train = run_json([f"--out_dir={out}", "--split=train"], capsys)
    val = run_json([f"--out_dir={out}"], capsys)
    assert train["tokens"] == meta["train_tokens"] - 1 and train["text"] == "the train split of tiny"
    assert val["tokens"] == meta["val_tokens"] - 1 and val["text"] == "the val split of tiny"
    ids = np.fromfile(data / "train.bin", dtype=np.uint16)
    assert train["bytes"] == len(text[1:meta["train_tokens"]].encode("utf-8"))
    assert len(ids) == meta["train_tokens"]


def test_a_dataset_of_another_trained_vocabulary_or_boundary_is_refused(tmp_path):
    """A bpe:N dataset whose vocabulary is another of the same size, and a documents dataset of
    the same characters as a plain char model: the ids mean other text, refused by name."""
    base = [bytes([b]) for b in range(256)]
    ours, theirs = Tokenizer.bpe_from_ranks(base + [b"Sp", b"eak"]), Tokenizer.bpe_from_ranks(base + [b"Fi", b"rst"])
    assert ours.vocab_size == theirs.vocab_size
    ids = theirs.encode(TEXT)
    data = write_dataset(tmp_path / "data", "other_bpe", theirs, ids, ids)
    write_dataset(data, "same_bpe", ours, ours.encode(TEXT), ours.encode(TEXT))
    out = save_model(tmp_path / "bpe", ours)
    with pytest.raises(UserError, match="both are trained BPE vocabularies, but different ones"):
        evaluate.main([f"--out_dir={out}", f"--data_dir={data}", "--dataset=other_bpe", "--device=cpu"])
    evaluate.main([f"--out_dir={out}", f"--data_dir={data}", "--dataset=same_bpe", "--device=cpu"])  # the same: scored

    plain, docs = Tokenizer.char_from_text(TEXT), Tokenizer.char_from_text(TEXT, documents="line")
    ids = [docs.eot_id, *docs.encode("Speak, speak."), docs.eot_id]
    write_dataset(data, "docs", docs, ids, ids)
    (tmp_path / "char").mkdir()
    with pytest.raises(UserError, match="only the data has a document-boundary token"):
        evaluate.main([f"--out_dir={save_model(tmp_path / 'char', plain)}", f"--data_dir={data}", "--dataset=docs",
                       "--device=cpu"])


def test_bits_per_char_of_a_bpe_model_counts_characters_not_bytes(tmp_path, text_file, capsys):
    """A BPE token holds bytes: bits per character divides by the characters they start, so
    on non-ASCII text it is larger than bits per byte, and the characters are the text's."""
    text = "Grüße aus Köln, 你好世界! Café crème.\n" * 4
    text_file.write_text(text, encoding="utf-8")
    base = [bytes([b]) for b in range(256)]
    tok = Tokenizer.bpe_from_ranks(base + ["你".encode(), "好".encode(), "üß".encode(), b"Gr"])
    out = save_model(tmp_path, tok, zero=True)
    r = run_json([f"--out_dir={out}", f"--input={text_file}"], capsys)
    ids = tok.encode(text)
    first = tok.decode(ids[:1])
    assert first == "Gr"  # the context, not scored
    scored = text[len(first):]
    assert r["bytes"] == len(scored.encode("utf-8"))
    assert r["chars"] == len(scored) < r["bytes"]
    assert r["bits_per_char"] == pytest.approx(r["bits_per_byte"] * r["bytes"] / r["chars"], rel=1e-9)
    assert r["bits_per_char"] > r["bits_per_byte"] * 1.05


def test_the_automatic_batch_keeps_a_pass_small_for_any_vocabulary():
    """--batch_size=0 sized a pass by its logits alone: a char model's pass took 2M tokens and
    several GB (4.2 GB for a 6x384 char model on the val split, 0.7 GB now, and 4x faster). Now a
    pass holds at most 8,192 tokens and about 512 MB of what grows with it."""
    for vocab, n_embd, block in ((65, 384, 256), (65, 64, 64), (50304, 768, 1024), (50257, 64, 64), (512, 128, 8)):
        config = GPTConfig(vocab_size=vocab, n_embd=n_embd, block_size=block)
        batch = evaluate.auto_batch_size(config)
        tokens = batch * block
        assert batch >= 1 and (tokens <= evaluate.TOKENS_PER_PASS or batch == 1)
        assert tokens * 4 * (3 * vocab + 16 * n_embd) <= evaluate.MEMORY_BUDGET or batch == 1
        assert tokens * 2 > min(evaluate.TOKENS_PER_PASS, evaluate.MEMORY_BUDGET // (4 * (3 * vocab + 16 * n_embd)))
    assert evaluate.auto_batch_size(GPTConfig(vocab_size=65, n_embd=384, block_size=256)) == 32


def test_drop_unknown_scores_the_text_without_them_and_counts_them_per_line(char_dir, char_tok, tmp_path, capsys):
    """A char model meets characters it never saw (next month's logs): --drop_unknown scores the
    text as if they were not there, and each --per_line record counts what its line lost, so the
    unusual lines can still be ranked."""
    path, clean = tmp_path / "new.txt", tmp_path / "clean.txt"
    path.write_text("Speak.\nSpeak Zed, 9#!\nhear me\n", encoding="utf-8")
    clean.write_text("Speak.\nSpeak ed, !\nhear me\n", encoding="utf-8")
    scores = tmp_path / "scores.jsonl"
    dropped = run_json([f"--out_dir={char_dir}", f"--input={path}", "--drop_unknown", f"--per_line={scores}"], capsys)
    assert run_json([f"--out_dir={char_dir}", f"--input={clean}"], capsys)["loss"] == dropped["loss"]
    records = [json.loads(line) for line in scores.read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["text"], r["unknown"]) for r in records] == [
        (1, "Speak.", 0), (2, "Speak Zed, 9#!", 3), (3, "hear me", 0)]
    assert records[1]["tokens"] == len("Speak ed, !") + 1
    evaluate.main([f"--out_dir={char_dir}", f"--input={path}", "--drop_unknown", "--device=cpu"])
    assert "--drop_unknown dropped 3 occurrence(s) of 3 character(s) the model never saw: 'Z' '9' '#'" in \
        capsys.readouterr().err
    tsv = tmp_path / "scores.tsv"
    run_json([f"--out_dir={char_dir}", f"--input={path}", "--drop_unknown", f"--per_line={tsv}"], capsys)
    assert tsv.read_text(encoding="utf-8").splitlines()[0].split("\t")[-2:] == ["unknown", "text"]


def test_a_tsv_of_lines_with_quotes_reads_back_whole_with_csv_and_pandas_rules(char_dir, tmp_path, capsys):
    """A log line that starts with a quote ("GET / HTTP/1.1" 200) comes back as written from
    csv.DictReader with tabs as delimiter (pandas.read_csv's rules too)."""
    import csv
    path = tmp_path / "access.txt"
    lines = ['"Speak" he', 'All: "hear me, speak"', "Before we proceed"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tsv = tmp_path / "scores.tsv"
    run_json([f"--out_dir={char_dir}", f"--input={path}", f"--per_line={tsv}", "--drop_unknown"], capsys)
    with open(tsv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["text"] for r in rows] == lines and [int(r["line"]) for r in rows] == [1, 2, 3]


def test_a_line_of_unknown_characters_only_scores_null_not_nan_and_a_link_to_the_input_is_refused(tmp_path, capsys):
    """A documents model, --drop_unknown: a line made of unknown characters only has no bytes
    left, so no bits per byte: JSON null (NaN is no JSON). A --per_line name that is a hard link
    to --input is the input itself: refused, the input kept."""
    tok = Tokenizer.char_from_text(TEXT, documents="line")
    out = save_model(tmp_path / "out", tok, seed=3)
    path = tmp_path / "u.txt"
    path.write_text("Speak.\n€€€\nhear me\n", encoding="utf-8")
    scores = tmp_path / "s.jsonl"
    run_json([f"--out_dir={out}", f"--input={path}", "--drop_unknown", f"--per_line={scores}"], capsys)
    records = [json.loads(line) for line in scores.read_text(encoding="utf-8").splitlines()]  # strict JSON
    assert "NaN" not in scores.read_text(encoding="utf-8")
    assert records[1]["unknown"] == 3 and records[1]["bytes"] == 0 and records[1]["bits_per_byte"] is None
    os.link(path, tmp_path / "same.tsv")
    with pytest.raises(UserError, match="is the --input file itself"):
        evaluate.main([f"--out_dir={out}", f"--input={path}", f"--per_line={tmp_path / 'same.tsv'}"])
    assert path.read_text(encoding="utf-8") == "Speak.\n€€€\nhear me\n"


def test_many_unknown_characters_are_named_up_to_twenty_and_counted(char_dir, tmp_path, capsys):
    """A text full of characters the model never saw (another alphabet) names the first twenty
    and counts the rest, refused or dropped, so the message stays one readable line."""
    greek = "αβγδεζηθικλμνξοπρστυφχψω"  # 24 characters no Shakespeare model saw
    path = tmp_path / "greek.txt"
    path.write_text(f"Speak {greek}\n", encoding="utf-8")
    shown = " ".join(repr(c) for c in greek[:20])
    with pytest.raises(UserError, match=f"holds 24 character\\(s\\) the char-level model never saw: {shown} and 4 more "):
        evaluate.main([f"--out_dir={char_dir}", f"--input={path}", "--device=cpu"])
    run_json([f"--out_dir={char_dir}", f"--input={path}", "--drop_unknown"], capsys)
    evaluate.main([f"--out_dir={char_dir}", f"--input={path}", "--drop_unknown", "--device=cpu"])
    assert f"dropped 24 occurrence(s) of 24 character(s) the model never saw: {shown} ...\n" in capsys.readouterr().err


def test_a_tsv_escapes_tabs_and_backslashes_so_every_row_has_its_columns(char_dir, tmp_path, capsys):
    """A line holding a tab or a backslash (a log's fields) is written to the TSV escaped (\\t,
    \\\\), as the header of --per_line promises: each row splits on tabs into the header's
    columns (cut, awk, a spreadsheet), and the text column reads back as the line, unescaped."""
    path = tmp_path / "log.txt"
    lines = ["Speak\tme", "hear \\ me", "Before"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tsv = tmp_path / "scores.tsv"
    run_json([f"--out_dir={char_dir}", f"--input={path}", f"--per_line={tsv}", "--drop_unknown"], capsys)
    rows = [row.split("\t") for row in tsv.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4 and all(len(row) == len(rows[0]) for row in rows)
    assert [row[-1] for row in rows[1:]] == ["Speak\\tme", "hear \\\\ me", "Before"]
