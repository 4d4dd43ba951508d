"""export.py and --init_from: the exports run in transformers and onnxruntime themselves with our
logits and our greedy text; a GPT-2 built by transformers samples and finetunes here; export then
import gives the same text. Offline: tiny models built in the test, nothing downloaded."""
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import export
import hf_format
import loading
import prepare
import sample
import train
from conftest import ROOT, SHARED, TINY, write_char_dataset
from errors import UserError
from model import GPT, GPTConfig
from tokenizer import Tokenizer

EXTRAS = "pip install -r requirements-extras.txt"
for _module in ("transformers", "tokenizers", "safetensors", "onnx", "onnxruntime"):
    pytest.importorskip(_module, reason=f"needs the extras: {EXTRAS}")
import onnxruntime as ort  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402

ENCODER_JSON = SHARED / "tiktoken" / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"
VOCAB_BPE = SHARED / "tiktoken" / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"
CHAR_PROMPT, BPE_PROMPT = "ROMEO:", "Hello, my lord"
N_NEW = 20  # prompt + new tokens stay within the tiny models' 32 positions


def gpt2_tokenizer():
    try:
        return Tokenizer.tiktoken("gpt2")
    except UserError as e:
        pytest.skip(str(e))


def greedy_sample(argv, capsys) -> str:
    """sample.py's greedy text (its standard output, without the final newline)."""
    sample.main([*argv, "--temperature=0", "--dtype=float32", "--device=cpu", f"--max_new_tokens={N_NEW}"])
    return capsys.readouterr().out.removesuffix("\n")


def hf_greedy(folder, prompt: str) -> str:
    """transformers' own greedy text for an HF folder (AutoModel + AutoTokenizer, offline)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                         pad_token_id=model.config.eos_token_id or 0)
    return tok.decode(out[0])


def our_logits(out_dir, ids: torch.Tensor) -> torch.Tensor:
    model, _, _ = loading.load_model(out_dir, "cpu")
    with torch.no_grad():
        logits, _ = model(ids, torch.zeros_like(ids))  # with targets: logits at every position
    return logits


def onnx_loop_code() -> str:
    docs = (ROOT / "docs" / "export.md").read_text(encoding="utf-8")
    return re.search(r"```python\n(# greedy generation with onnxruntime.*?)```", docs, re.S).group(1)


def onnx_loop(folder, prompt: str) -> str:
    """docs/export.md's onnxruntime generation loop, run as written in a fresh Python."""
    code = onnx_loop_code().replace('"exports/shakespeare-onnx", "ROMEO:", 100', f"{str(folder)!r}, {prompt!r}, {N_NEW}")
    code += "import sys\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.removesuffix("\n")


def check_export(out_dir, tmp, prompt: str, capsys):
    """Export out_dir both ways; transformers and onnxruntime give our logits and greedy text,
    and the HF export comes back through --init_from with the same text."""
    hf_dir, onnx_dir = tmp / "hf", tmp / "onnx"
    export.main([f"--out_dir={out_dir}", "--format=hf", f"--dest={hf_dir}"])
    export.main([f"--out_dir={out_dir}", "--format=onnx", f"--dest={onnx_dir}"])
    capsys.readouterr()
    ours = greedy_sample([f"--out_dir={out_dir}", f"--prompt={prompt}"], capsys)
    _, tokenizer, ckpt = loading.load_model(out_dir, "cpu")
    ids = torch.tensor([tokenizer.encode(ours)[:ckpt["model_args"]["block_size"]]])
    expected = our_logits(out_dir, ids)

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        assert (hf(ids).logits - expected).abs().max().item() <= 1e-4
    assert hf_greedy(hf_dir, prompt) == ours

    session = ort.InferenceSession(str(onnx_dir / "model.onnx"))
    logits = session.run(["logits"], {"input_ids": ids.numpy()})[0]
    assert np.abs(logits - expected.numpy()).max() <= 1e-4
    assert onnx_loop(onnx_dir, prompt) == ours

    card_prompt, card_tokens = export.card_prompt(tokenizer, ckpt["model_args"]["block_size"])
    readme_loop = onnx_loop_code().replace('"exports/shakespeare-onnx", "ROMEO:", 100',
                                           f'{json.dumps(str(onnx_dir))}, "{card_prompt}", {card_tokens}')
    assert readme_loop in (onnx_dir / "README.md").read_text()  # the model card shows the same loop, sized to fit
    fast = tokenizers.Tokenizer.from_file(str(onnx_dir / "tokenizer.json"))
    assert fast.encode(ours).ids == tokenizer.encode(ours)
    assert greedy_sample([f"--init_from={hf_dir}", f"--prompt={prompt}"], capsys) == ours
    card = (hf_dir / "README.md").read_text()
    assert "| validation loss |" in card and f"{ckpt['best_val_loss']:.4f}" in card
    return hf_dir


# ---------------------------------------------------------------------------- the tokenizer

def test_char_tokenizer_json_round_trips_exactly():
    text = "Ça va?\n\n  ROMEO: naïve   café\tend\r\n"
    ours = Tokenizer.char_from_text(text)
    fast = hf_format.hf_tokenizer(ours)
    assert fast.encode(text).ids == ours.encode(text)
    assert fast.decode(ours.encode(text)) == text


def test_bpe_tokenizer_json_has_tiktokens_ids_and_special_tokens():
    # digit runs, whitespace before newlines and at the very end: where regex engines differ
    text = "Hello  world!\n\n\tnaïve café 😀 1234567 don't  \r\n 日本語 x  \n\n  y \n  "
    for name in ("gpt2", "cl100k_base"):
        try:
            ours = Tokenizer.tiktoken(name)
        except UserError:
            continue
        fast = hf_format.hf_tokenizer(ours)
        assert fast.encode(text).ids == ours.encode(text)
        assert fast.decode(ours.encode(text)) == text
        for special in ours.encoding.special_tokens_set:  # at tiktoken's ids, gaps below them or not
            assert fast.token_to_id(special) == ours.encoding.encode_single_token(special)


# ---------------------------------------------------------------------------- char-level export

@pytest.fixture(scope="module")
def char_run(tmp_path_factory, shakespeare_text):
    """A tiny char-level model trained with bias=False (train.py's default): its HF export
    carries zero biases."""
    root = tmp_path_factory.mktemp("char")
    write_char_dataset(root / "data", shakespeare_text[:20_000])
    train.main([f"--data_dir={root / 'data'}", f"--out_dir={root / 'out'}", *TINY, "--max_iters=10",
                "--eval_interval=10"])
    return root


def test_char_model_exports_to_transformers_and_onnxruntime(char_run, tmp_path, capsys):
    hf_dir = check_export(char_run / "out", tmp_path, CHAR_PROMPT, capsys)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["activation_function"] == "gelu" and config["n_positions"] == 32
    # the web demo's model picker lists the export and serves it as it serves the checkpoint
    import app
    import hardware
    assert hf_dir in app.find_model_folders(tmp_path)
    models = app.Models({"ckpt": char_run / "out", "hf": hf_dir}, hardware.resolve("cpu", "float32"))
    texts = [list(app.generate(models, 100, 0.0, CHAR_PROMPT, 40, 0.0, 0, 1.0, 1, model=name))[-1] for name in models.folders]
    assert texts[0] == texts[1] and len(texts[0]) > len(CHAR_PROMPT)
    # its card shows the run's figures, which the export recorded, as the checkpoint's does
    ckpt = checkpoint.load(char_run / "out" / "ckpt.pt")
    card = app.model_card("hf", models.get("hf"))
    assert "- **dataset**: tiny;" in card and f"**trained**: 10 iterations; **val loss**: {ckpt['best_val_loss']:.4f}" in card
    card, curve = app.card_and_curve("hf", models.get("hf"), tmp_path)  # an export keeps no metrics: said why
    assert curve is None and "- **loss curve**: none here (no metrics.jsonl in this folder: an export keeps none" in card
    assert app.card_and_curve("ckpt", models.get("ckpt"), tmp_path)[1] is not None


def test_a_card_says_the_loss_of_the_model_it_ships(char_run, tmp_path):
    """A finetune that gets worse under always_save_checkpoint keeps its last model: the card (and
    app.py's card of the export) give that model's val loss, with the run's best beside it, not
    the best alone, which was another model's."""
    import app
    import hardware
    out = tmp_path / "worse"
    train.main([f"--data_dir={char_run / 'data'}", f"--out_dir={out}", *TINY, f"--init_from={char_run / 'out'}",
                "--max_iters=4", "--eval_interval=2", "--learning_rate=3", "--warmup_iters=0"])
    ckpt = checkpoint.load(out / "ckpt.pt")
    assert not ckpt["holds_best"] and ckpt["val_loss"] > ckpt["best_val_loss"]
    assert ckpt["best_iter"] == 0  # the model the finetune started from
    said = (f"{ckpt['val_loss']:.4f} (this model's; the run's best was {ckpt['best_val_loss']:.4f}, at iteration "
            f"0: the model this run started from)")
    export.main([f"--out_dir={out}", f"--dest={tmp_path / 'hf'}"])
    assert f"| validation loss | {said} |" in (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    models = app.Models({"hf": tmp_path / "hf"}, hardware.resolve("cpu", "float32"))
    assert f"**val loss**: {said}" in app.model_card("hf", models.get("hf"))


# ---------------------------------------------------------------------------- GPT-2 from transformers

@pytest.fixture(scope="module")
def toy_gpt2(tmp_path_factory):
    """A GPT-2 built and saved by transformers itself (GPT-2's real tokenizer, toy weights)."""
    gpt2_tokenizer()
    folder = tmp_path_factory.mktemp("toy-gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # larger weights than GPT-2's init, so greedy text is not one token repeated
        for p in model.parameters():
            p.mul_(10 if p.dim() == 2 else 1)
    model.save_pretrained(folder)
    # positional: transformers 4 names them vocab_file, merges_file; 5 names them vocab, merges
    tokenizer = transformers.GPT2TokenizerFast(str(ENCODER_JSON), str(VOCAB_BPE))
    assert len(tokenizer) == 50257
    tokenizer.save_pretrained(folder)
    return folder


def test_a_gpt2_of_transformers_loads_with_what_its_card_can_say(toy_gpt2):
    """No run of ours behind it: the card's dataset says what it is, and the run's figures are unknown."""
    model, tokenizer, info = loading.load(str(toy_gpt2), "cpu")
    assert not model.training and tokenizer.vocab_size == 50257
    assert {k: v for k, v in info.items() if k != "model_args"} == {
        "config": {"dataset": "(Hugging Face folder)"}, "iter_num": None, "best_val_loss": None, "instruct": None,
        "val_loss": None, "holds_best": None, "best_iter": None}
    assert info["model_args"]["n_layer"] == 2


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory, shakespeare_text):
    """A small GPT-2-tokenized dataset in the prepared-data format."""
    tok = gpt2_tokenizer()
    ids = np.array(tok.encode(shakespeare_text[:30_000]), dtype=np.uint16)
    folder = tmp_path_factory.mktemp("bpe") / "data"
    (folder / "gpt2tiny").mkdir(parents=True)
    n = int(len(ids) * 0.9)
    ids[:n].tofile(folder / "gpt2tiny" / "train.bin")
    ids[n:].tofile(folder / "gpt2tiny" / "val.bin")
    meta = {"version": 1, "tokenizer": "gpt2", "vocab_size": tok.vocab_size, "dtype": "uint16",
            "train_tokens": n, "val_tokens": len(ids) - n, "eot_id": tok.eot_id, "sources": []}
    (folder / "gpt2tiny" / "meta.json").write_text(json.dumps(meta))
    return folder


def test_sample_from_a_transformers_gpt2_gives_its_greedy_text(toy_gpt2, capsys):
    ours = greedy_sample([f"--init_from={toy_gpt2}", f"--prompt={BPE_PROMPT}"], capsys)
    assert ours == hf_greedy(toy_gpt2, BPE_PROMPT)
    assert len(set(gpt2_tokenizer().encode(ours))) > 5  # real text, not one token repeated
    model, _ = hf_format.load(str(toy_gpt2))
    hf = transformers.GPT2LMHeadModel.from_pretrained(toy_gpt2).eval()
    ids = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        assert (model(ids, ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4


def test_finetune_gpt2_resume_sample_and_export(toy_gpt2, bpe_data, tmp_path, capsys):
    out = tmp_path / "out"
    base = [f"--data_dir={bpe_data}", "--dataset=gpt2tiny", f"--out_dir={out}", "--block_size=32",
            "--batch_size=4", "--eval_iters=2", "--learning_rate=1e-3", "--warmup_iters=0", "--dtype=float32",
            "--device=cpu", "--eval_interval=15", "--dropout=0.1", "--log_interval=5"]
    train.main([*base, f"--init_from={toy_gpt2}", "--max_iters=15"])
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val/loss" in r]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.5  # loss falls
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["activation"] == "gelu_tanh" and ckpt["model_args"]["block_size"] == 32
    assert ckpt["tokenizer"]["name"] == "gpt2" and ckpt["model_args"]["n_layer"] == 2
    train.main([*base, "--init_from=resume", "--max_iters=20"])
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 20
    capsys.readouterr()
    # the finetuned checkpoint samples, and exports as a GPT-2 BPE model with GPT-2's GELU
    hf_dir = check_export(out, tmp_path, BPE_PROMPT, capsys)
    assert json.loads((hf_dir / "config.json").read_text())["activation_function"] == "gelu_new"
    check_gguf(out, tmp_path / "gguf", capsys)


def llama_cpp_greedy(folder, prompt: str) -> str:
    """llama.cpp's own greedy text for model.gguf (through the xllamacpp wheel, in a fresh Python)."""
    code = f"""
import json, xllamacpp as xlc
params = xlc.CommonParams()
params.model.path = {str(folder / "model.gguf")!r}
params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
params.warmup = False
server = xlc.Server(params)
result = server.handle_completions({{"prompt": {prompt!r}, "max_tokens": {N_NEW}, "temperature": 0,
                                     "top_k": 1, "ignore_eos": True}})
print("TEXT " + json.dumps(result["choices"][0]["text"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("TEXT ")][-1]
    return prompt + json.loads(line[len("TEXT "):])


def check_gguf(out_dir, dest, capsys):
    """llama.cpp runs the GGUF export with our greedy text (its own tokenizer reads the prompt)."""
    pytest.importorskip("gguf", reason=f"needs the extras: {EXTRAS}")
    pytest.importorskip("xllamacpp", reason=f"needs the extras: {EXTRAS}")
    export.main([f"--out_dir={out_dir}", "--format=gguf", f"--dest={dest}"])
    capsys.readouterr()
    ours = greedy_sample([f"--out_dir={out_dir}", f"--prompt={BPE_PROMPT}"], capsys)
    assert llama_cpp_greedy(dest, BPE_PROMPT) == ours


def test_gguf_of_a_model_with_exact_gelu_and_no_biases(tmp_path, capsys):
    """llama.cpp computes GPT-2's tanh GELU; a from-scratch model with nanoGPT's exact GELU and
    bias=False (zeros in the file) still gives our greedy text there."""
    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    args = dict(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                bias=False, activation="gelu")
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)  # larger than the init's weights, so greedy text varies
    checkpoint.save({"model": model.state_dict(), "model_args": args, "optimizer": {}, "iter_num": 0,
                     "best_val_loss": float("inf"), "config": {}, "tokenizer": tok.describe()},
                    tmp_path / "out" / "ckpt.pt")
    check_gguf(tmp_path / "out", tmp_path / "gguf", capsys)


def test_gguf_of_a_rotary_model_with_an_untied_head(tmp_path, capsys):
    """Rotary positions go to llama.cpp's gptneox architecture (its NEOX rope, sequential
    residuals), an untied head to its output tensor: llama.cpp gives our greedy text."""
    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    args = dict(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                bias=False, activation="gelu_tanh", rotary=True, tie_head=False)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)  # the zero-initialized head too, so greedy text varies
    checkpoint.save({"model": model.state_dict(), "model_args": args, "optimizer": {}, "iter_num": 0,
                     "best_val_loss": float("inf"), "config": {}, "tokenizer": tok.describe()},
                    tmp_path / "out" / "ckpt.pt")
    check_gguf(tmp_path / "out", tmp_path / "gguf", capsys)
    import gguf
    assert gguf.GGUFReader(tmp_path / "gguf" / "model.gguf").fields["general.architecture"].contents() == "gptneox"


def test_finetune_refuses_shape_flags_and_a_foreign_tokenizer(toy_gpt2, bpe_data, char_run, tmp_path):
    common = [f"--init_from={toy_gpt2}", f"--out_dir={tmp_path / 'x'}", "--device=cpu", "--max_iters=1", "--warmup_iters=0"]
    with pytest.raises(UserError, match=r"different model shape: --n_layer=3 \(.* has 2\)"):
        train.main([f"--data_dir={bpe_data}", "--dataset=gpt2tiny", "--n_layer=3", *common])
    with pytest.raises(UserError, match="--block_size=128 .* has 64 positions"):
        train.main([f"--data_dir={bpe_data}", "--dataset=gpt2tiny", "--block_size=128", *common])
    (tmp_path / "shaped.py").write_text("n_layer = 3\nn_head = 2\n", encoding="utf-8")  # a recipe's own shape
    with pytest.raises(UserError, match=r"--n_layer=3 \(set by the config file\) \(.* has 2\); drop these flags, "
                                        r"and leave out the config file"):
        train.main([str(tmp_path / "shaped.py"), f"--data_dir={bpe_data}", "--dataset=gpt2tiny", *common])
    with pytest.raises(UserError, match="cannot read dataset 'tiny': the model's tokenizer is gpt2 \\(tiktoken\\), the data's char-level"):
        train.main([f"--data_dir={char_run / 'data'}", "--dataset=tiny", "--block_size=16", *common])
    assert not (tmp_path / "x" / "ckpt.pt").exists()


def test_gpt2_names_come_from_the_local_cache_only(toy_gpt2, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="gpt2 is not in transformers' local cache .*`hf download openai-community/gpt2`"):
        sample.main(["--init_from=gpt2", "--max_new_tokens=1"])
    # the layout huggingface_hub gives a downloaded model: refs/main -> snapshots/<commit>/
    repo = tmp_path / "hub" / "models--openai-community--gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / ("0" * 40)).symlink_to(toy_gpt2, target_is_directory=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert greedy_sample(["--init_from=gpt2", f"--prompt={BPE_PROMPT}"], capsys) == hf_greedy(toy_gpt2, BPE_PROMPT)


def test_export_replaces_only_its_own_folders(char_run, tmp_path, capsys):
    """A folder export.py did not write is refused, naming what it holds; --force writes the
    export among its files, replacing those of the same name only (a mistyped --dest that is a
    run folder keeps its ckpt.pt)."""
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    (dest / "ckpt.pt").write_bytes(b"a training run's checkpoint")
    (dest / "README.md").write_text("# my own card\n")
    with pytest.raises(UserError, match=r"holds files export.py did not write \(README.md, ckpt.pt, notes.txt;"):
        export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])
    assert (dest / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}", "--force"])
    err = capsys.readouterr().err
    assert "kept what you had added or changed there: ckpt.pt, notes.txt" in err
    assert "replaced what you had added or changed there (--force): README.md" in err
    assert (dest / "ckpt.pt").read_bytes() == b"a training run's checkpoint" and (dest / "notes.txt").read_text() == "mine"
    (dest / "ckpt.pt").unlink()
    (dest / "notes.txt").unlink()
    capsys.readouterr()
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}", "--format=onnx"])  # ours: replaced, and said
    assert (f"note: this ONNX (--format=onnx) export replaced the Hugging Face (--format=hf) export that was in "
            f"{dest}; to keep both, export each format to its own --dest (e.g. {dest}-hf)") in capsys.readouterr().err
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "config.json", "model.onnx",
                                                     "model_with_past.onnx", "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]  # no temporary folder left behind


def test_a_file_edited_after_the_export_is_not_replaced_silently(char_run, tmp_path, capsys):
    """The card records each exported file's sha256: a card (or config) the user edited since is
    theirs. Exporting again refuses to replace it, changing nothing; --force replaces it and says
    so. A file the next export does not write is kept."""
    dest = tmp_path / "dest"
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])  # unchanged: replaced without a word
    with open(dest / "README.md", "a", encoding="utf-8") as f:
        f.write("\n## Intended use\nmy notes\n")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(UserError, match="holds README.md, which you added or changed there since export.py wrote it"):
        export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    (dest / "generation_config.json").write_text('{"max_length": 8}', encoding="utf-8")  # tuned by hand
    capsys.readouterr()
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}", "--format=onnx", "--force"])
    err = capsys.readouterr().err
    assert "replaced what you had added or changed there (--force): README.md" in err
    assert "kept what you had added or changed there: generation_config.json" in err  # onnx writes none
    assert "Intended use" not in (dest / "README.md").read_text(encoding="utf-8")
    assert (dest / "generation_config.json").read_text(encoding="utf-8") == '{"max_length": 8}'


def test_a_new_export_keeps_what_the_user_added_to_the_last(char_run, tmp_path, capsys):
    """An export folder a user added a file to (notes, a license) and exports into again: the
    export's own files are replaced (another format's too), the user's stay, and it says so."""
    dest = tmp_path / "dest"
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])
    (dest / "notes.txt").write_text("mine", encoding="utf-8")
    (dest / "pictures").mkdir()
    (dest / "pictures" / "curve.png").write_bytes(b"png")
    capsys.readouterr()
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}", "--format=onnx"])
    assert (dest / "notes.txt").read_text(encoding="utf-8") == "mine" and (dest / "pictures" / "curve.png").exists()
    assert not (dest / "model.safetensors").exists()  # the hf export's file: replaced by the onnx export
    assert "kept what you had added or changed there: notes.txt, pictures" in capsys.readouterr().err


def test_a_new_export_refuses_to_replace_a_file_the_user_added(char_run, tmp_path, capsys):
    """A file the user added under a name the new export writes (their own model.onnx beside an
    hf export) is not replaced silently: refused, nothing changed; --force replaces it and says so."""
    dest = tmp_path / "dest"
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])
    (dest / "model.onnx").write_text("my own", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(UserError, match="holds model.onnx, which you added or changed there since export.py wrote it"):
        export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}", "--format=onnx"])
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]
    capsys.readouterr()
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}", "--format=onnx", "--force"])
    err = capsys.readouterr().err
    assert "replaced what you had added or changed there (--force): model.onnx" in err and "kept what" not in err
    assert (dest / "model.onnx").read_bytes() != b"my own"


def test_a_failed_export_into_the_working_folder_leaves_the_last_one_whole(char_run, tmp_path, monkeypatch):
    """--dest=. swaps file by file: a failure partway (a full disk) takes the new files out and
    puts the previous export's back, none of one beside the other."""
    here = tmp_path / "e"
    here.mkdir()
    monkeypatch.chdir(here)
    export.main([f"--out_dir={char_run / 'out'}", "--dest=."])
    before = {p.name: p.read_bytes() for p in here.iterdir()}
    real_replace, moved = os.replace, []

    def replace(src, dst):
        if os.path.dirname(dst) == str(here) and ".tmp-" in str(src):  # the new export's files moving in
            moved.append(dst)
            if len(moved) == 3:
                raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UserError, match="nothing was replaced"):
        export.main([f"--out_dir={char_run / 'out'}", "--dest=.", "--format=onnx"])
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in here.iterdir()} == before


def test_dot_and_dot_dot_destinations_are_the_real_folders(char_run, tmp_path, monkeypatch):
    """--dest=. is the folder one is in: written into it (the folder stays, so a shell there
    sees the files), its own files never replaced, --force or not. DIR/sub/.. is DIR."""
    here = tmp_path / "e"
    here.mkdir()
    monkeypatch.chdir(here)
    inode = here.stat().st_ino
    export.main([f"--out_dir={char_run / 'out'}", "--dest=."])
    export.main([f"--out_dir={char_run / 'out'}", "--dest=.", "--format=onnx"])  # ours: its files replaced
    assert here.stat().st_ino == inode and (here / "model.onnx").is_file() and not (here / "model.safetensors").exists()
    assert f'"{here}"' in (here / "README.md").read_text()  # the card loads the folder by its real path
    (here / "README.md").unlink()
    for force in ([], ["--force"]):
        with pytest.raises(UserError, match=r"--dest=.*/e is the folder you are in, and it holds files export.py did not "
                                            r"write \(config.json, model.onnx, model_with_past.onnx, tokenizer.json, "
                                            r"tokenizer_config.json\)"):
            export.main([f"--out_dir={char_run / 'out'}", "--dest=.", *force])
        assert (here / "model.onnx").is_file()  # nothing deleted
    (here / "sub").mkdir()
    monkeypatch.chdir(here / "sub")
    with pytest.raises(UserError, match="holds the folder you are in"):
        export.main([f"--out_dir={char_run / 'out'}", "--dest=..", "--force"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"] and (here / "model.onnx").is_file()

    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match=r"--dest=.*/other holds files export.py did not write \(sub;"):
        export.main([f"--out_dir={char_run / 'out'}", f"--dest={other / 'sub' / '..'}"])
    (other / "sub").rmdir()
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={other / 'sub' / '..'}"])  # empty: written
    assert (other / "model.safetensors").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["e", "other"]


def test_an_unwritable_destination_is_one_line_and_leaves_nothing(char_run, tmp_path, monkeypatch):
    """A folder the user may not write in (root writes anywhere, so the refusal is the OS's
    error raised where export.py makes its folders): one line, no folder left half made."""
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(export.Path, "mkdir", refuse)
    with pytest.raises(UserError, match=r"cannot write --dest=.*Permission denied; choose a folder you can write to"):
        export.main([f"--out_dir={char_run / 'out'}", f"--dest={tmp_path / 'a' / 'b'}"])
    assert list(tmp_path.iterdir()) == []


def test_onnx_weights_beside_the_graph_for_large_models(char_run, tmp_path, monkeypatch):
    """Above protobuf's limit the weights go to one .data file per graph; onnxruntime reads it."""
    monkeypatch.setattr(export, "ONNX_INLINE_BYTES", 0)  # treat the tiny model as a large one
    export.main([f"--out_dir={char_run / 'out'}", "--format=onnx", f"--dest={tmp_path / 'onnx'}"])
    files = sorted(p.name for p in (tmp_path / "onnx").iterdir())
    assert {"model.onnx", "model.onnx.data", "model_with_past.onnx", "model_with_past.onnx.data"} <= set(files)
    assert (tmp_path / "onnx" / "model.onnx").stat().st_size < 100_000 < (tmp_path / "onnx" / "model.onnx.data").stat().st_size
    ids = torch.tensor([[1, 2, 3, 4]])
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    logits = session.run(["logits"], {"input_ids": ids.numpy()})[0]
    assert np.abs(logits - our_logits(char_run / "out", ids).numpy()).max() <= 1e-4


def test_trained_vocabulary_documents_model_comes_back_from_its_export(tmp_path, capsys):
    """A bpe:N vocabulary in documents mode: transformers reads the export's ids as ours, and
    --init_from=<export> gets back the same tokenizer (ranks, documents mode): same documents."""
    from data.make_combos import make_combos
    (tmp_path / "combos.txt").write_text("\n".join(make_combos(600, seed=3)) + "\n")
    prepare.main(["--input", str(tmp_path / "combos.txt"), "--name", "c", "--data_dir", str(tmp_path / "data"),
                  "--tokenizer=bpe:300", "--documents=line", "--block_size=16", "--num_workers=1"])
    out = tmp_path / "out"
    train.main([f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}", *TINY, "--dataset=c", "--max_iters=10",
                "--eval_interval=10"])
    hf_dir = tmp_path / "hf"
    export.main([f"--out_dir={out}", "--format=hf", f"--dest={hf_dir}"])
    capsys.readouterr()
    flags = ["--prompt=", "--num_samples=3", "--max_new_tokens=30", "--seed=5"]
    ours = greedy_sample([f"--out_dir={out}", *flags], capsys)
    assert greedy_sample([f"--init_from={hf_dir}", *flags], capsys) == ours
    _, tokenizer, _ = loading.load_model(out, "cpu")
    back = hf_format.load_tokenizer(hf_dir)
    assert back.describe() == tokenizer.describe() and back.documents == "line"
    text = "Jab - Cross - Lead Hook"
    assert transformers.AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"] == tokenizer.encode(text)


def test_gguf_of_an_instruction_model_carries_its_chat_template(tmp_path):
    gguf = pytest.importorskip("gguf", reason=f"needs the extras: {EXTRAS}")
    import template
    tok = gpt2_tokenizer()
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    custom = {**template.TEMPLATE, "user": "[INST] {content} [/INST]"}
    export.write_gguf(model, tok, tmp_path, {"template": custom, "chat": True})
    field = gguf.GGUFReader(tmp_path / "model.gguf").fields["tokenizer.chat_template"]
    assert field.contents() == template.chat_template(custom)
    export.write_gguf(model, tok, tmp_path)  # a model of plain text: no template
    # (GGUF keys are stored as plain strings: a search of the bytes is the reader's answer in a
    # fraction of its seconds of parsing 50,257 tokens)
    assert b"tokenizer.chat_template" not in (tmp_path / "model.gguf").read_bytes()
    # llama.cpp reads the context from the file: a wrong one is no error there, only a model run
    # past what it was trained on. GGUF's uint32 type, then the value, after the key
    data = (tmp_path / "model.gguf").read_bytes()
    at = data.index(b"gpt2.context_length") + len(b"gpt2.context_length")
    assert struct.unpack_from("<II", data, at) == (4, 16)


def test_char_documents_model_exports_its_boundary_and_block_size(tmp_path, capsys):
    """A char-level documents model in the GPT-2 format: tokenizer.json holds <|endoftext|> at the
    boundary id (so --init_from gets back the same tokenizer), config.json names it as bos and
    eos, and tokenizer_config.json's model_max_length is the model's context (n_positions)."""
    tok = Tokenizer.char_from_text("jab cross hook uppercut", documents="line")
    args = dict(block_size=24, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True)
    torch.manual_seed(0)
    checkpoint.save({"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args, "optimizer": {}, "iter_num": 0,
                     "best_val_loss": float("inf"), "config": {}, "tokenizer": tok.describe()},
                    tmp_path / "out" / "ckpt.pt")
    hf_dir = tmp_path / "hf"
    export.main([f"--out_dir={tmp_path / 'out'}", "--format=hf", f"--dest={hf_dir}"])
    capsys.readouterr()
    back = hf_format.load_tokenizer(hf_dir)
    assert back.describe() == tok.describe() and back.eot_id == tok.eot_id == len(tok.chars)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_positions"] == 24
    assert config["eos_token_id"] == config["bos_token_id"] == tok.eot_id
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["model_max_length"] == 24
    assert "context 24 tokens" in (hf_dir / "README.md").read_text()  # the card's shape line
    fast = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert fast.eos_token_id == tok.eot_id and fast.model_max_length == 24
    assert fast("<|endoftext|>jab")["input_ids"] == [tok.eot_id, *tok.encode("jab")]
    assert transformers.AutoConfig.from_pretrained(hf_dir).eos_token_id == tok.eot_id


@pytest.mark.parametrize("documents", [None, "line"])
@pytest.mark.parametrize("block_size", [2, 3, 5, 8, 64])
def test_the_cards_prompt_and_new_tokens_fit_the_context(block_size, documents):
    """Neither transformers' generate() nor the ONNX loop crops the context: the card's prompt
    (with a documents model's boundary token) and its new tokens, less the last one, which is
    never fed back, must fit in block_size."""
    tok = Tokenizer.char_from_text("ROMEO: abcdefg\n", documents=documents)
    prompt, new_tokens = export.card_prompt(tok, block_size)
    used = len(tok.encode(prompt)) + (1 if documents else 0)
    assert new_tokens >= 1 and used + new_tokens - 1 < block_size, (prompt, new_tokens)
    assert new_tokens == min(export.NEW_TOKENS, block_size - used)  # as many as fit


def test_the_cards_commands_run_as_written_from_a_path_with_a_space(char_run, tmp_path, capsys):
    """The card's shell commands quote a path holding a space, so they paste whole."""
    import shlex
    dest = tmp_path / "my exports" / "char hf"
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])
    command = re.search(r"`(python sample.py [^`]*)`", (dest / "README.md").read_text(encoding="utf-8")).group(1)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "sample.py"] and argv[2:] == [f"--init_from={dest}"]
    capsys.readouterr()
    sample.main([*argv[2:], "--max_new_tokens=5", f"--prompt={CHAR_PROMPT}"])
    assert capsys.readouterr().out.startswith(CHAR_PROMPT)


def test_an_export_for_the_hub_loads_by_its_repository_id(char_run, tmp_path, capsys):
    """--repo_id: the card's title and transformers code name the Hub repository (the card ships
    with the folder, so no local path of the exporter's shows there), and our scripts' lines say
    how to download it first. ONNX and GGUF folders are read from disk: refused."""
    dest = tmp_path / "hub"
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}", "--repo_id=someone/tiny-char"])
    card = (dest / "README.md").read_text(encoding="utf-8")
    assert "# someone/tiny-char\n" in card and 'from_pretrained("someone/tiny-char")' in card
    assert "`hf download someone/tiny-char --local-dir tiny-char`, then `python train.py --init_from=tiny-char ...`" in card
    assert str(tmp_path) not in card.split("## Training config")[0]
    for argv, message in ((["--repo_id=no-slash"], "--repo_id must be a Hub repository's USER/NAME"),
                          (["--repo_id=a/.."], "--repo_id must be a Hub repository's USER/NAME"),
                          (["--repo_id=a/b", "--format=onnx"], "--repo_id is for --format=hf")):
        with pytest.raises(UserError, match=message):
            export.main([f"--out_dir={char_run / 'out'}", f"--dest={tmp_path / 'x'}", *argv])


def test_exporting_a_run_that_still_trains_says_so(char_run, tmp_path, capsys):
    import shutil
    import socket
    import time
    run = tmp_path / "run"
    shutil.copytree(char_run / "out", run)
    note = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": "python train.py"}
    (run / "train.lock").write_text(json.dumps(note), encoding="utf-8")  # what a training run holds
    export.main([f"--out_dir={run}", f"--dest={tmp_path / 'e'}"])
    assert f"note: a run still trains in {run} (PID {os.getpid()}" in capsys.readouterr().err
    (run / "train.lock").write_text(json.dumps({**note, "pid": 2 ** 22 + 17}), encoding="utf-8")  # a dead run's
    export.main([f"--out_dir={run}", f"--dest={tmp_path / 'e'}"])
    assert "still trains" not in capsys.readouterr().err


@pytest.mark.parametrize("card_change", ["hub tools", "line deleted", "null", "crlf"])
def test_a_card_whose_file_list_changed_loses_nothing(char_run, tmp_path, card_change):
    """huggingface_hub's card tools rewrite the front matter as YAML; a user may delete or break
    the `exported_files` line; a Windows checkout turns every line end into CRLF. None of these
    lets a new export delete the user's files: a list still read (YAML) or no list at all keeps
    everything unless --force; CRLF alone is no change."""
    dest = tmp_path / "dest"
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])
    (dest / "LICENSE").write_text("MIT\n", encoding="utf-8")
    card = dest / "README.md"
    if card_change == "hub tools":
        from huggingface_hub import ModelCard
        hub_card = ModelCard.load(card)
        hub_card.data.license = "mit"
        hub_card.save(card)
        assert "exported_files:\n" in card.read_text(encoding="utf-8")  # YAML's block mapping now
    elif card_change in ("line deleted", "null"):
        text = re.sub(r"^exported_files: .*$", "exported_files: null" if card_change == "null" else "",
                      card.read_text(encoding="utf-8"), flags=re.M)
        card.write_text(text, encoding="utf-8")
    else:
        for path in dest.iterdir():
            if path.suffix in (".json", ".md"):
                path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
        export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])  # nothing changed: replaced
        assert (dest / "LICENSE").read_text(encoding="utf-8") == "MIT\n"
        return
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    said = ("which you added or changed there since export.py wrote it" if card_change == "hub tools" else
            "is an export whose card no longer lists the files export.py wrote")
    with pytest.raises(UserError, match=said):
        export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}", "--force"])
    assert (dest / "LICENSE").read_text(encoding="utf-8") == "MIT\n"  # kept, --force or not


def test_a_foreign_folder_is_refused_naming_five_of_its_files_and_counting_the_rest(char_run, tmp_path):
    """A --dest full of someone's files (a mistyped path): the message names the first five,
    sorted, and counts the others, so the user sees what the folder is without a screenful."""
    dest = tmp_path / "dest"
    dest.mkdir()
    for name in "abcdefg":
        (dest / f"{name}.txt").write_text(name)
    with pytest.raises(UserError, match=r"holds files export.py did not write \(a.txt, b.txt, c.txt, d.txt, e.txt "
                                        r"and 2 more;"):
        export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])
    assert sorted(p.name for p in dest.iterdir()) == [f"{name}.txt" for name in "abcdefg"]
    for name in "fg":
        (dest / f"{name}.txt").unlink()
    with pytest.raises(UserError, match=r"did not write \(a.txt, b.txt, c.txt, d.txt, e.txt;"):  # five: all named
        export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])


@pytest.mark.parametrize("repo_id", ["someone/tiny-char/tree/main", "someone/tiny char", "https://huggingface.co/someone/x"])
def test_a_repo_id_that_is_not_user_slash_name_is_refused_whole(char_run, tmp_path, repo_id):
    """--repo_id pasted from a browser (a URL, a page of the repository) or with a space: refused
    in one line before anything is written, not a card whose code loads a repository that does
    not exist."""
    with pytest.raises(UserError, match="--repo_id must be a Hub repository's USER/NAME"):
        export.main([f"--out_dir={char_run / 'out'}", f"--dest={tmp_path / 'x'}", f"--repo_id={repo_id}"])
    assert not (tmp_path / "x").exists()


def test_a_run_record_of_the_wrong_kinds_reads_as_unknown(tmp_path):
    """An export's tokenizer_config.json edited by hand (a best val loss as text, a count as a
    boolean): what the folder says of its run is each figure of its kind or None, never a value
    the card then cannot format."""
    unknown = dict.fromkeys(("dataset", "iter_num", "best_val_loss", "val_loss", "holds_best", "best_iter"))
    config = {hf_format.OUR_RUN_KEY: {"dataset": 7, "iter_num": True, "best_val_loss": "1.23", "val_loss": False,
                                      "holds_best": "yes", "best_iter": 2.5}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert hf_format.run_of(tmp_path) == unknown
    config[hf_format.OUR_RUN_KEY] = {"dataset": "tiny", "iter_num": 10, "best_val_loss": 2, "val_loss": 2.5,
                                     "holds_best": False, "best_iter": 4}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert hf_format.run_of(tmp_path) == {"dataset": "tiny", "iter_num": 10, "best_val_loss": 2, "val_loss": 2.5,
                                          "holds_best": False, "best_iter": 4}


def test_an_export_from_before_cards_held_sha256s_is_replaced_and_the_users_files_kept(char_run, tmp_path, capsys):
    """An export written by an earlier version (its card's exported_files a list of names, no
    sha256s): exporting again replaces the files it lists without a word and keeps what the
    user added beside them."""
    dest = tmp_path / "dest"
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])
    card = (dest / "README.md").read_text(encoding="utf-8")
    line = next(x for x in card.splitlines() if x.startswith(f"{export.EXPORTED_FILES}: "))
    names = sorted(json.loads(line.partition(": ")[2]))
    (dest / "README.md").write_text(card.replace(line, f"{export.EXPORTED_FILES}: {json.dumps(names)}"), encoding="utf-8")
    (dest / "notes.txt").write_text("mine", encoding="utf-8")
    capsys.readouterr()
    export.main([f"--out_dir={char_run / 'out'}", f"--dest={dest}"])
    err = capsys.readouterr().err
    assert "kept what you had added or changed there: notes.txt" in err and "replaced what" not in err
    assert (dest / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_a_finetune_keeps_where_it_started_through_a_resume(char_run, tmp_path):
    """The card of a finetuned model says what it was finetuned from, also after the run was
    stopped and resumed (the resumed config says init_from=resume)."""
    base = char_run / "out"
    flags = [f"--data_dir={char_run / 'data'}", f"--out_dir={tmp_path / 'ft'}", "--dataset=tiny", "--batch_size=4",
             "--eval_iters=2", "--eval_interval=2", "--dtype=float32", "--device=cpu", "--warmup_iters=0"]
    train.main([*flags, f"--init_from={base}", "--max_iters=2"])
    train.main([*flags, "--init_from=resume", "--max_iters=4"])
    assert checkpoint.load(tmp_path / "ft" / "ckpt.pt")["config"]["init_from"] == "resume"
    export.main([f"--out_dir={tmp_path / 'ft'}", f"--dest={tmp_path / 'e'}"])
    assert f"finetuned from {base}" in (tmp_path / "e" / "README.md").read_text(encoding="utf-8")
    ckpt = checkpoint.load(tmp_path / "ft" / "ckpt.pt")  # a checkpoint from before it was recorded
    del ckpt["started_from"]
    checkpoint.save(ckpt, tmp_path / "old" / "ckpt.pt")
    export.main([f"--out_dir={tmp_path / 'old'}", f"--dest={tmp_path / 'e2'}"])
    assert "trained (its checkpoint does not record whether it started from a pretrained model)" in \
        (tmp_path / "e2" / "README.md").read_text(encoding="utf-8")
