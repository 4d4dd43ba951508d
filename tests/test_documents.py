"""Documents mode and trained vocabularies: prepare.py --documents=line|blank and
--tokenizer=bpe:N, document-mode training (rows start at documents, attention never crosses
a boundary, positions restart), and sampling that ends each sample at its document's end
or at --stop strings."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import config
import dataset
import documents
import prepare
import sample
import train
from conftest import TINY
from data.make_combos import MOVES, SEPARATOR, is_valid, make_combos
from errors import UserError
from model import GPT, GPTConfig, document_mask
from stopping import StopCondition
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent

# multilingual, with emoji (4-byte UTF-8), combining marks, CRLF and an inner blank-only line
MIXED = ("Jab - Cross 🥊\n"
         "Ложь - Удар в корпус\r\n"
         "   \n"
         "日本語のコンボ 🙂🙂 - e\u0301lan\n"
         "\n"
         "مرحبا - Slip - Roll\n"
         "last line without a newline 🎉")


def prepare_docs(tmp_path, text, *flags, name="d"):
    """Run prepare.py on text; returns (meta, {split: ids})."""
    src = tmp_path / f"{name}.txt"
    src.write_bytes(text.encode("utf-8"))
    prepare.main(["--input", str(src), "--name", name, "--data_dir", str(tmp_path / "data"),
                  "--num_workers=1", *flags])
    folder = tmp_path / "data" / name
    meta = json.loads((folder / "meta.json").read_text())
    return meta, {s: np.fromfile(folder / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")}


def documents_of(ids, tokenizer):
    """The documents of a split: [eot] doc [eot] doc ... [eot], decoded."""
    cuts = np.flatnonzero(ids == tokenizer.eot_id)
    assert cuts[0] == 0 and cuts[-1] == len(ids) - 1
    return [tokenizer.decode(ids[a + 1:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def test_split_documents_line_and_blank():
    pieces = ["a b\r\n\n  \nc", "d\n\ne\nf\n", "\n \ng"]  # a document may span reads
    assert list(documents.split_documents(iter(pieces), "line")) == ["a b", "cd", "e", "f", "g"]
    assert list(documents.split_documents(iter(pieces), "blank")) == ["a b", "cd", "e\nf", "g"]
    assert list(documents.split_documents(iter(["\n\n", " \n"]), "line")) == []


@pytest.mark.parametrize("tokenizer", ["char", "gpt2", "bpe:300"])
def test_documents_round_trip_and_val_holds_whole_documents(tmp_path, tokenizer):
    lines = [line.removesuffix("\r") for line in MIXED.split("\n") if line.strip()] * 8
    text = "\n".join(lines)
    meta, splits = prepare_docs(tmp_path, text, f"--tokenizer={tokenizer}", "--documents=line",
                                "--block_size=8", "--val_fraction=0.25")
    tok = Tokenizer.from_description(meta)
    assert tok.documents == "line" and meta["documents"] == "line"
    train_docs, val_docs = documents_of(splits["train"], tok), documents_of(splits["val"], tok)
    # every document comes back exactly, each in one split, and val holds whole documents
    assert sorted(train_docs + val_docs) == sorted(lines)
    assert len(val_docs) == meta["val_documents"] == len(lines) - int(len(lines) * 0.75)
    assert meta["train_documents"] == len(train_docs)
    assert [doc for doc in lines if doc in val_docs]  # val documents are input lines, not pieces
    if tokenizer == "char":
        assert meta["eot_id"] == len(meta["chars"]) == meta["vocab_size"] - 1
        assert "\n" not in meta["chars"]  # line ends are not part of documents
    if tokenizer == "bpe:300":
        assert meta["vocab_size"] == 300 and meta["eot_id"] == 299
        assert len(splits["train"]) < 0.75 * len("".join(train_docs).encode())  # the merges compress
    stats = meta["document_tokens"]
    assert stats["max"] >= stats["median"] >= stats["min"] >= 1
    # the same tokenizer from the description train.py saves in the checkpoint
    again = Tokenizer.from_description(json.loads(json.dumps(tok.describe())))
    assert again.encode(lines[3]) == tok.encode(lines[3]) and again.vocab_size == tok.vocab_size


def test_blank_mode_and_order_without_shuffle(tmp_path):
    docs = [f"record {i}\nline two of {i}" for i in range(20)]
    meta, splits = prepare_docs(tmp_path, "\n\n \n".join(docs), "--tokenizer=char", "--documents=blank",
                                "--shuffle=false", "--block_size=8")
    tok = Tokenizer.from_description(meta)
    assert documents_of(splits["train"], tok) == docs[:18] and documents_of(splits["val"], tok) == docs[18:]


def test_bpe_file_mode_round_trip_is_exact(tmp_path):
    """bpe:N without documents: the one file is one text, decoded back byte for byte (as read:
    its "\r\n" as "\n")."""
    text = MIXED * 30
    meta, splits = prepare_docs(tmp_path, text, "--tokenizer=bpe:320", "--block_size=8")
    tok = Tokenizer.from_description(meta)
    assert "documents" not in meta and tok.encoding is not None
    assert tok.decode(np.concatenate([splits["train"], splits["val"]])) == text.replace("\r\n", "\n")
    # tiktoken is the runtime: the description holds ranks and pattern, nothing else needed
    assert set(meta["bpe"]) == {"pattern", "ranks", "special_tokens"} and len(meta["bpe"]["ranks"]) == 319


def test_many_long_documents_give_a_warning(tmp_path, capsys):
    prepare_docs(tmp_path, "\n".join("x" * (i % 40 + 1) for i in range(50)), "--tokenizer=char",
                 "--documents=line", "--block_size=16")
    err = capsys.readouterr().err
    assert "warning: " in err and "longer than --block_size=16" in err


# ---------------------------------------------------------------- model: the mask

def test_document_positions_and_mask():
    eot = 9
    x = torch.tensor([[3, 4, eot, 5, 6, 7, eot, 8]])
    positions = dataset.document_positions(x, eot)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 3, 0, 1]]
    mask = document_mask(positions)[0, 0]
    assert mask[5].tolist() == [False, False, True, True, True, True, False, False]
    assert mask[1].tolist() == [True, True] + [False] * 6


@pytest.mark.parametrize("path", ["sdpa", "cpu_dropout", "cpu_bf16"])
def test_no_attention_crosses_a_document_boundary(path):
    """Changing document 1 of a row never changes the logits of document 2 in that row,
    on every attention path: SDPA with a mask, and _CPUAttention (dropout, bf16 autocast)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=12, n_layer=2, n_head=2, n_embd=32,
                          dropout=0.1 if path == "cpu_dropout" else 0.0))
    model.train(path != "sdpa")
    eot = 11
    x = torch.tensor([[eot, 1, 2, 3, 4, 5, eot, 6, 7, 8, 9, 1, eot, 2, 3, 4]] * 2)
    changed = x.clone()
    changed[:, 1:6] = torch.tensor([7, 7, 7, 7, 7])
    logits = []
    for idx in (x, changed):
        torch.manual_seed(1)  # the same dropout masks
        with torch.autocast("cpu", torch.bfloat16, enabled=path == "cpu_bf16"):
            out, _ = model(idx, idx, positions=dataset.document_positions(idx, eot))
        logits.append(out.float())
    assert torch.equal(logits[0][:, 6:], logits[1][:, 6:])  # documents 2 and 3 did not see document 1
    assert not torch.allclose(logits[0][:, 1:6], logits[1][:, 1:6])


def test_cpu_attention_with_a_mask_matches_sdpa_forward_and_backward():
    from cpu_kernels import _CPUAttention
    torch.manual_seed(0)
    B, nh, T, hs = 3, 2, 24, 8
    positions = dataset.document_positions(torch.randint(0, 4, (B, T)), 0)
    mask = document_mask(positions)
    q, k, v = (torch.randn(B, nh, T, hs, requires_grad=True) for _ in range(3))
    g = torch.randn(B, nh, T, hs)
    ours = _CPUAttention.apply(q, k, v, 0.0, mask)
    grads = torch.autograd.grad(ours, (q, k, v), g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    assert torch.allclose(ours, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------- train.py in document mode

@pytest.fixture(scope="module")
def combos_data(tmp_path_factory):
    """Synthetic combos prepared char-level in line mode ('combos' under data_dir)."""
    root = tmp_path_factory.mktemp("combos")
    (root / "combos.txt").write_text("\n".join(make_combos(1500, seed=1)) + "\n")
    prepare.main(["--input", str(root / "combos.txt"), "--name", "combos", "--data_dir", str(root / "data"),
                  "--tokenizer=char", "--documents=line", "--block_size=32", "--num_workers=1"])
    return root


def test_rows_start_at_documents_and_cover_long_ones(combos_data):
    data = dataset.Dataset(str(combos_data / "data"), "combos")
    assert data.documents
    ids = np.fromfile(data.paths["train"], dtype=data.dtype)
    starts = data.row_starts("train", 32)
    bounds = np.flatnonzero(ids == data.eot_id)
    inside = np.setdiff1d(starts, bounds)  # windows inside documents longer than the block
    assert len(inside) and all((s - bounds[bounds < s][-1]) % 32 == 0 for s in inside)
    x, y, positions = data.get_batch("train", 8, 32, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert (positions[:, 0] == 0).all() and ((x == data.eot_id) == (positions == 0))[:, 1:].all()


def test_rows_never_run_past_the_end_of_a_split(tmp_path):
    """A row needs block_size + 1 tokens from its start: the last document of train (5 tokens with
    its boundaries) fills one to the split's last token and is read; the last of val is one token
    short, so that start is never drawn (neither are the windows of a too-short inner part)."""
    from conftest import write_token_dataset
    block_size = 4
    # document starts (0 is the boundary token) and, inside the first document, a window at 4
    train_ids = [0, 1, 2, 3, 4, 5, 6, 0, 7, 8, 9, 0]  # the start at 7 ends at the split's last token
    val_ids = [0, 1, 2, 3, 4, 5, 6, 0, 7, 8, 0]  # the start at 7 would need a token after the end
    write_token_dataset(tmp_path / "data", "docs", train=train_ids, val=val_ids, documents="line", eot_id=0)
    data = dataset.Dataset(str(tmp_path / "data"), "docs")
    assert data.documents
    assert data.row_starts("train", block_size).tolist() == [0, 4, 7]
    assert data.row_starts("val", block_size).tolist() == [0, 4]
    gen = torch.Generator().manual_seed(0)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        windows = {tuple(ids[s:s + block_size + 1]) for s in data.row_starts(split, block_size)}
        seen = set()
        for _ in range(10):
            x, y, positions = data.get_batch(split, 16, block_size, gen, "cpu")
            for row_x, row_y in zip(x.tolist(), y.tolist()):
                assert row_x[1:] == row_y[:-1]
                seen.add((*row_x, row_y[-1]))
        assert seen == windows, split  # every start drawn, and only those


@pytest.mark.parametrize("flags", [[], ["--dropout=0.1", "--dtype=bfloat16", "--gradient_accumulation_steps=2"],
                                   ["--rotary", "--norm=rmsnorm", "--activation=relu2", "--qk_norm", "--bigram",
                                    "--tie_head=false"]])  # the model options take per-document positions
def test_document_mode_exact_resume(combos_data, tmp_path, flags):
    """Stopped at 4 and resumed to 6 ends bit-identical to one run to 6, also on the CPU
    speed paths (bf16 autocast and dropout go through _CPUAttention with the mask)."""
    common = [f"--data_dir={combos_data / 'data'}", *TINY, "--dataset=combos", "--eval_interval=2",
              "--lr_decay_iters=6", *flags]
    train.main([*common, f"--out_dir={tmp_path / 'full'}", "--max_iters=6"])
    train.main([*common, f"--out_dir={tmp_path / 'part'}", "--max_iters=4"])
    train.main([*common, f"--out_dir={tmp_path / 'part'}", "--max_iters=6", "--init_from=resume"])
    full, part = (checkpoint.load(tmp_path / d / "ckpt.pt") for d in ("full", "part"))
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, part["model"][name]), name
    assert full["tokenizer"]["documents"] == "line" and full["tokenizer"]["eot_id"] == full["model_args"]["vocab_size"] - 1


def test_document_mode_under_torchrun(combos_data, tmp_path):
    """Two gloo processes train in document mode and save one data sampler each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), f"--data_dir={combos_data / 'data'}", f"--out_dir={tmp_path / 'out'}",
           *TINY, "--dataset=combos", "--max_iters=2", "--eval_interval=2", "--lr_decay_iters=2",
           "--gradient_accumulation_steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "document mode" in proc.stdout
    assert len(checkpoint.load(tmp_path / "out" / "ckpt.pt")["rng"]["data"]) == 2


def test_combos_train_then_sample_whole_documents(combos_data, tmp_path, capsys):
    """A few seconds of training on combos; an empty prompt gives one combo per sample, on
    a single line, made mostly of known moves."""
    out = tmp_path / "out"
    train.main([f"--data_dir={combos_data / 'data'}", f"--out_dir={out}", "--dataset=combos", "--device=cpu",
                "--dtype=float32", "--n_layer=2", "--n_head=2", "--n_embd=48", "--block_size=32",
                "--batch_size=16", "--max_iters=150", "--eval_interval=150", "--eval_iters=2",
                "--log_interval=50", "--learning_rate=1e-2", "--warmup_iters=10", "--lr_decay_iters=150",
                "--min_lr=1e-3"])
    capsys.readouterr()
    sample.main([f"--out_dir={out}", "--prompt=", "--num_samples=12", "--max_new_tokens=150",
                 "--temperature=0.5", "--device=cpu"])
    samples = capsys.readouterr().out.split("\n---------------\n")[:-1]
    assert len(samples) == 12
    assert all("\n" not in s and s for s in samples)  # each sample ended at its document's end
    moves = [m for s in samples for m in s.split(SEPARATOR)]
    assert sum(m in MOVES for m in moves) >= 0.7 * len(moves), samples
    # a prompt file ends in a line end, which no document of line mode holds: it is the file's
    (tmp_path / "p.txt").write_text(samples[0][:5] + "\n", encoding="utf-8")
    greedy = [f"--out_dir={out}", "--max_new_tokens=20", "--temperature=0", "--device=cpu"]
    sample.main([*greedy, f"--prompt=FILE:{tmp_path / 'p.txt'}"])
    from_file = capsys.readouterr().out
    sample.main([*greedy, f"--prompt={samples[0][:5]}"])
    assert from_file == capsys.readouterr().out and from_file.startswith(samples[0][:5])


# ---------------------------------------------------------------- stopping and --stop

def test_stop_condition_boundary_and_strings():
    tok = Tokenizer.char_from_text("abc END", documents="line")
    eot = tok.eot_id
    stop = StopCondition.for_model(tok, 3, stop_strings=["END"])
    rows = ["ab cEN", "aEND c", "abc"]
    streamed = ""
    for step in range(6):
        ids = [tok.encode(r[step])[0] if step < len(r) else eot for r in rows]
        stop.update(ids)
        streamed += stop.new_text(0)
        if step == 4:
            assert streamed == "ab c"  # "EN" could still start "END": held back
    stop.finish()
    streamed += stop.new_text(0)
    assert [stop.text(b) for b in range(3)] == ["ab cEN", "a", "abc"] and stop.all_done
    assert streamed == "ab cEN"


def test_stop_flag_ends_samples_of_any_model(tiny_data, tmp_path, capsys):
    """A plain (not documents) char model: --stop cuts at the first stop string, which is
    not printed; a stop string that never comes changes nothing."""
    out = tmp_path / "out"
    train.main([f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, "--max_iters=2", "--eval_interval=2",
                "--lr_decay_iters=2"])
    args = [f"--out_dir={out}", "--prompt=ROMEO:", "--max_new_tokens=40", "--temperature=0", "--device=cpu"]
    capsys.readouterr()
    sample.main(args)
    generated = capsys.readouterr().out.removeprefix("ROMEO:").removesuffix("\n")
    stop = generated[8:10]
    sample.main([*args, f"--stop={stop}", "--stop=never seen"])
    assert capsys.readouterr().out == "ROMEO:" + generated[:generated.index(stop)] + "\n"


def test_stop_strings_typed_with_escapes_in_any_shell(tiny_data, tmp_path, capsys):
    """cmd.exe cannot type a line end: --stop="\\n" (backslash, n) ends a sample at a line end as
    bash's $'\\n' does, \\\\ is a backslash; a stop string a char model can never write (a
    character it never saw) is said in a note instead of silently never stopping."""
    assert sample.unescaped("\\n\\n") == "\n\n" and sample.unescaped("a\\tb") == "a\tb"
    assert sample.unescaped("C:\\\\x") == "C:\\x" and sample.unescaped("\\x") == "\\x"  # other escapes stay
    out = tmp_path / "out"
    train.main([f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, "--max_iters=2", "--eval_interval=2",
                "--lr_decay_iters=2"])
    args = [f"--out_dir={out}", "--prompt=ROMEO:", "--max_new_tokens=300", "--temperature=1", "--seed=3",
            "--device=cpu"]
    capsys.readouterr()
    sample.main(args)
    generated = capsys.readouterr().out.removeprefix("ROMEO:").removesuffix("\n")
    assert "\n" in generated[1:], generated  # ends at its first line end (not the prompt's)
    sample.main([*args, "--stop=\\n"])
    assert capsys.readouterr().out == "ROMEO:" + generated[:generated.index("\n")] + "\n"
    sample.main([*args, "--stop=END\u00a7", "--stop=never"])
    err = capsys.readouterr().err
    assert "note: --stop='END\u00a7' holds '\u00a7', which this model never writes: no sample ends there" in err
    assert "--stop='never'" not in err


def test_list_settings_repeat_and_replace_the_config_file(tmp_path):
    (tmp_path / "c.py").write_text("stop = ['A', 'B']\n")
    assert config.parse_config(sample.SampleConfig, [str(tmp_path / "c.py")])[0].stop == ["A", "B"]
    cfg, _ = config.parse_config(sample.SampleConfig, [str(tmp_path / "c.py"), "--stop=C", "--stop", "D E"])
    assert cfg.stop == ["C", "D E"]
    assert config.parse_config(sample.SampleConfig, [])[0].stop == []


def test_combo_scores_read_one_sample_or_many(tmp_path, capsys):
    """sample.py prints one sample without a line of dashes, several each followed by one:
    --score reads both, says so when there is none, and --help prints (its text holds a %)."""
    from data import make_combos as combos
    (tmp_path / "train.txt").write_text("Jab - Cross\n", encoding="utf-8")
    (tmp_path / "one.txt").write_text("Jab - Cross\n", encoding="utf-8")
    (tmp_path / "two.txt").write_text("Jab - Cross\n---------------\nJab - Hop\n---------------\n", encoding="utf-8")
    (tmp_path / "none.txt").write_text("", encoding="utf-8")
    assert combos.read_samples(str(tmp_path / "one.txt")) == ["Jab - Cross"]
    assert combos.read_samples(str(tmp_path / "two.txt")) == ["Jab - Cross", "Jab - Hop"]
    combos.main(["--score", str(tmp_path / "two.txt"), "--out", str(tmp_path / "train.txt")])
    assert capsys.readouterr().out.startswith("2 samples: 50.0% valid combos")
    with pytest.raises(UserError, match="holds no sample: write one with `python sample.py"):
        combos.main(["--score", str(tmp_path / "none.txt"), "--out", str(tmp_path / "train.txt")])
    with pytest.raises(SystemExit) as e:
        combos.main(["--help"])
    assert e.value.code == 0 and "the % of valid combos" in capsys.readouterr().out


def test_combo_generator_is_valid_and_reproducible():
    combos = make_combos(200, seed=3)
    assert combos == make_combos(200, seed=3) and all(is_valid(c) for c in combos)
    assert not is_valid("Jab - Crosss") and not is_valid("Jab\nCross")


def test_as_text_reads_any_pieces_as_text_mode_reads_the_file():
    """as_text gives what open(path, encoding="utf-8-sig") reads (universal newlines, one
    leading byte-order mark dropped), however the text is cut into pieces: a "\\r\\n" cut in
    two is still one line end."""
    import io
    import random
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice(["a", "é", " ", "\n", "\r", "\r\n", "\ufeff"]) for _ in range(rng.randint(0, 30)))
        text = rng.choice(["", "\ufeff"]) + text
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        expected = io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8-sig", newline=None).read()
        assert "".join(documents.as_text(pieces)) == expected, (pieces, expected)


def test_a_plain_models_long_prompt_note_names_no_template(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    train.main([f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, "--max_iters=1"])
    capsys.readouterr()
    sample.main([f"--out_dir={out}", "--prompt=" + "ROMEO: " * 10, "--max_new_tokens=2", "--device=cpu"])
    err = capsys.readouterr().err
    assert "note: the prompt is 70 tokens, more than the model's context of 32: it reads only the last 32\n" in err


def test_combo_scoring_of_a_missing_or_non_utf8_file_is_one_line(tmp_path):
    from data import make_combos as combos
    with pytest.raises(UserError, match="nope.txt not found$"):
        combos.read_samples(str(tmp_path / "nope.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="^cannot read .*latin1.txt: 'utf-8' codec can't decode"):
        combos.read_samples(str(tmp_path / "latin1.txt"))
