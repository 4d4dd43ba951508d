"""export.py for every model option: each option alone and all together, with a char-level
tokenizer and with a trained BPE vocabulary in documents mode. Each export runs in its runtime
itself: transformers (GPT-2 folders plainly, the others with trust_remote_code and its own
generate() and cache), onnxruntime (the model card's loop), and comes back through
--init_from; all give sample.py's greedy text. Offline: tiny models built here."""
import contextlib
import dataclasses
import inspect
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import checkpoint
import export
import hf_format
import loading
import sample
from conftest import ROOT
from errors import UserError
from model import GPT2_SHAPE, GPT, GPTConfig, ModelOptions
from tokenizer import Tokenizer

for _module in ("transformers", "tokenizers", "safetensors", "onnx", "onnxruntime"):
    pytest.importorskip(_module, reason="needs the extras: pip install -r requirements-extras.txt")
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import transformers  # noqa: E402

PROMPT, N_NEW = "ROMEO:", 16  # prompt + new tokens stay within the tiny models' 32 positions
ALONE = {"rotary": {"rotary": True}, "rmsnorm": {"norm": "rmsnorm"}, "relu2": {"activation": "relu2"},
         "gelu_tanh": {"activation": "gelu_tanh"}, "qk_norm": {"qk_norm": True}, "untied_head": {"tie_head": False},
         "bigram": {"bigram": True}, "x0_lambdas": {"x0_lambdas": True}, "value_embeds": {"value_embeds": True},
         "no_bias": {"bias": False}}
ALL = {"activation": "relu2", "norm": "rmsnorm", "rotary": True, "qk_norm": True, "tie_head": False,
       "bigram": True, "x0_lambdas": True, "value_embeds": True, "bias": False}
CASES = {**ALONE, "all": ALL}


def test_every_model_option_is_tested_and_known_to_the_remote_code():
    """An option added to model.py must join CASES here, and configuration_nanogpt.py (with
    modeling_nanogpt.py) must take it, before its models export."""
    import importlib.util
    beyond = {f.name for f in dataclasses.fields(ModelOptions)} - set(GPT2_SHAPE) - {"zero_init_proj"}
    assert beyond | {"bias"} <= {k for options in ALONE.values() for k in options}
    spec = importlib.util.spec_from_file_location("configuration_nanogpt", hf_format.REMOTE_CODE / "configuration_nanogpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    taken = set(inspect.signature(module.NanoGPTConfig.__init__).parameters) - {"self", "kwargs"}
    assert taken == set(hf_format.NANOGPT_FIELDS)


def bpe_tokenizer(text: str) -> Tokenizer:
    """A small byte-level BPE vocabulary in documents mode, as prepare.py --tokenizer=bpe:N
    --documents=line makes: every byte, then a few merges, then <|endoftext|>."""
    merges = [b"th", b"the", b"e ", b"ou", b"an", b"in", b"er", b"RO", b"ROM", b"EO", b"O:", b"\n\n"]
    return Tokenizer.bpe_from_ranks([bytes([b]) for b in range(256)] + merges, documents="line")


@pytest.fixture(scope="module")
def tokenizers(shakespeare_text):
    text = shakespeare_text[:5000]
    # "lower": a char vocabulary without the letters of PROMPT
    return {"char": Tokenizer.char_from_text(text), "bpe": bpe_tokenizer(text),
            "lower": Tokenizer.char_from_text("abcdefghijklmnopqrstuvwxyz ,.\n")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizers):
    """(case, tokenizer kind[, block_size]) -> folder holding out/ckpt.pt, hf/ and onnx/ exports
    of a 1-layer model with random weights (large enough that every option changes the greedy
    text), built on first use and shared by the tests of the module."""
    done = {}

    def get(case: str, kind: str, block_size: int = 32):
        if (case, kind, block_size) not in done:
            root = tmp_path_factory.mktemp(f"{case}-{kind}-{block_size}")
            tok = tokenizers[kind]
            args = dict(block_size=block_size, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, dropout=0.0,
                        **{"bias": True, **CASES[case]})
            torch.manual_seed(0)
            model = GPT(GPTConfig(**args))
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn_like(p) * 0.3)
            checkpoint.save({"model": model.state_dict(), "model_args": args, "optimizer": {}, "iter_num": 0,
                             "best_val_loss": float("inf"), "config": {}, "tokenizer": tok.describe()},
                            root / "out" / "ckpt.pt")
            for fmt in ("hf", "onnx"):
                export.main([f"--out_dir={root / 'out'}", f"--format={fmt}", f"--dest={root / fmt}"])
            done[case, kind, block_size] = root
        return done[case, kind, block_size]

    return get


def greedy_sample(argv, prompt: str = PROMPT, max_new_tokens: int = N_NEW) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        sample.main([*argv, f"--prompt={prompt}", "--temperature=0", "--dtype=float32", "--device=cpu",
                     f"--max_new_tokens={max_new_tokens}"])
    return out.getvalue().removesuffix("\n")


def hf_greedy(folder, tokenizer: Tokenizer, use_cache=True) -> tuple[str, transformers.PreTrainedModel]:
    """transformers' own greedy text (generate() with its cache), prompted as sample.py prompts."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = tok(PROMPT).input_ids
    if tokenizer.documents:  # a new document starts with its boundary token
        ids = [tok.eos_token_id] + ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False, use_cache=use_cache)
    return tok.decode(out[0], skip_special_tokens=True), model


def onnx_greedy(folder, tokenizer: Tokenizer) -> str:
    """The model card's onnxruntime loop, run as written (in this process) for N_NEW tokens."""
    card = export.onnx_loop(str(folder), tokenizer, *export.card_prompt(tokenizer, 32))
    assert card in (folder / "README.md").read_text(encoding="utf-8")
    return run_snippet(export.onnx_loop(str(folder), tokenizer, PROMPT, N_NEW))


def run_snippet(code: str) -> str:
    """What code prints, run in this process, without its final newline."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})
    return out.getvalue().removesuffix("\n")


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_runtime_gives_our_greedy_text(case, kind, exported, tokenizers):
    tokenizer = tokenizers[kind]
    root = exported(case, kind)
    ours = greedy_sample([f"--out_dir={root / 'out'}"])
    assert len(ours) > len(PROMPT)
    model, _, _ = loading.load_model(root / "out", "cpu")
    ids = torch.tensor([tokenizer.encode(ours)[:32]])  # re-encoded text can be longer than the tokens made
    with torch.no_grad():
        expected = model(ids, ids)[0]  # with targets: logits at every position

    config = json.loads((root / "hf" / "config.json").read_text())
    remote = bool(model.config.non_gpt2_options())
    assert config["model_type"] == ("nanogpt" if remote else "gpt2")
    assert (root / "hf" / "modeling_nanogpt.py").is_file() == remote  # GPT-2 folders stay plain
    text, hf = hf_greedy(root / "hf", tokenizer)
    with torch.no_grad():
        assert (hf(ids).logits - expected).abs().max().item() <= 1e-4
    assert text == ours

    session = ort.InferenceSession(str(root / "onnx" / "model.onnx"))
    logits = session.run(["logits"], {"input_ids": ids.numpy()})[0]
    assert np.abs(logits - expected.numpy()).max() <= 1e-4
    assert onnx_greedy(root / "onnx", tokenizer) == ours

    assert greedy_sample([f"--init_from={root / 'hf'}"]) == ours  # export -> import keeps the text
    back, _ = hf_format.load(str(root / "hf"))
    # a GPT-2 folder has biases: a bias-free model comes back with zero ones
    assert back.config == (model.config if remote else GPTConfig(**{**vars(model.config), "bias": True}))


@pytest.mark.parametrize("case, kind, block_size", [("no_bias", "lower", 8), ("all", "bpe", 4)])
def test_the_cards_snippets_run_as_written_on_a_short_context(case, kind, block_size, exported, tokenizers):
    """A context shorter than "ROMEO:" and 100 new tokens, a vocabulary without those letters
    (a GPT-2 folder), a documents model with every option whose "ROMEO:" leaves no room: the
    card's transformers and onnxruntime snippets run as written, the loop with our greedy text."""
    tokenizer, root = tokenizers[kind], exported(case, kind, block_size)
    snippets = {fmt: re.search(r"```python\n(.*?)```", (root / fmt / "README.md").read_text(encoding="utf-8"), re.S).group(1)
                for fmt in ("hf", "onnx")}
    torch.manual_seed(0)  # the transformers snippet samples
    sampled, greedy = run_snippet(snippets["hf"]), run_snippet(snippets["onnx"])
    prompt, max_new_tokens = export.card_prompt(tokenizer, block_size)
    assert prompt in ("a", "R") and max_new_tokens == block_size - len(tokenizer.encode(prompt)) - bool(tokenizer.documents)
    assert f"max_new_tokens={max_new_tokens}," in snippets["hf"] and sampled.startswith(prompt)
    ours = greedy_sample([f"--out_dir={root / 'out'}"], prompt, max_new_tokens)
    assert greedy == ours and len(ours) > len(prompt)


def test_transformers_cache_and_cards_of_a_remote_code_model(exported, tokenizers):
    """generate() with transformers' cache equals generate() without it; the card says how to
    load the folder (trust_remote_code, the document's boundary token)."""
    root = exported("all", "bpe")
    assert hf_greedy(root / "hf", tokenizers["bpe"])[0] == hf_greedy(root / "hf", tokenizers["bpe"], use_cache=False)[0]
    card = (root / "hf" / "README.md").read_text(encoding="utf-8")
    assert "trust_remote_code=True" in card and "tokenizer.eos_token_id" in card
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanogpt.NanoGPTForCausalLM"
    assert "auto_map" not in json.loads((root / "onnx" / "config.json").read_text())
    names = [i.name for i in ort.InferenceSession(str(root / "onnx" / "model_with_past.onnx")).get_inputs()]
    assert names == ["input_ids", "past_key_values.0.key", "past_key_values.0.value", "past_input_ids"]


def test_onnx_loop_runs_without_torch_and_is_documented(exported, tokenizers):
    """The loop of docs/export.md is the card's, and runs in a Python without torch."""
    root = exported("all", "char")
    docs = (ROOT / "docs" / "export.md").read_text(encoding="utf-8")
    assert export.onnx_loop("exports/shakespeare-onnx", tokenizers["char"]) in docs
    code = export.onnx_loop(str(root / "onnx"), tokenizers["char"]).replace(f'"{PROMPT}", 100', f'"{PROMPT}", {N_NEW}')
    code += "import sys\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.removesuffix("\n") == greedy_sample([f"--out_dir={root / 'out'}"])


def test_gguf_names_what_llama_cpp_lacks_and_writes_nothing(exported, tmp_path):
    root = exported("all", "bpe")
    with pytest.raises(UserError) as e:
        export.main([f"--out_dir={root / 'out'}", "--format=gguf", f"--dest={tmp_path / 'gguf'}"])
    message = str(e.value)
    assert "\n" not in message and "nothing was written" in message
    docs = (ROOT / "docs" / "export.md").read_text(encoding="utf-8")
    for lack in export.GGUF_LACKS.values():
        assert lack in message and f"| {lack}" in docs
    assert "a pre-tokenizer verified here" in message  # a trained vocabulary: llama.cpp's is unknown
    assert not (tmp_path / "gguf").exists()


def test_train_continues_from_a_remote_code_folder(exported, shakespeare_text, tmp_path):
    """train.py --init_from=<nanogpt folder>: the model keeps every option and its weights."""
    import train
    from conftest import TINY, write_char_dataset
    root = exported("all", "char")
    write_char_dataset(tmp_path / "data", shakespeare_text[:5000])  # the export's characters
    flags = [a for a in TINY if not a.startswith(("--n_layer", "--n_head", "--n_embd", "--block_size"))]
    # two steps of a tiny learning rate: the weights stay (nearly) the folder's, so does the text
    train.main([f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", *flags, f"--init_from={root / 'hf'}",
                "--max_iters=2", "--eval_interval=2", "--learning_rate=1e-9", "--min_lr=0"])
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert {k: ckpt["model_args"][k] for k in ALL} == ALL and ckpt["model_args"]["n_layer"] == 1
    assert greedy_sample([f"--out_dir={tmp_path / 'out'}"]) == greedy_sample([f"--out_dir={root / 'out'}"])
    # a shorter context crops the positions: a rotary model has no table to crop
    train.main([f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'short'}", *flags, f"--init_from={root / 'hf'}",
                "--max_iters=2", "--eval_interval=2", "--block_size=16"])
    assert torch.load(tmp_path / "short" / "ckpt.pt", weights_only=True)["model_args"]["block_size"] == 16


def test_a_damaged_remote_code_folder_is_one_clear_line(exported, tmp_path):
    import shutil
    folder = tmp_path / "hf"
    shutil.copytree(exported("all", "char") / "hf", folder)
    config = json.loads((folder / "config.json").read_text())
    for change, message in (({"n_head": 3}, "must be divisible by --n_head"), ({"rotary": "yes"}, "rotary 'yes'"),
                            ({"n_layer": 2}, "the weights do not match its config.json")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=message):
            hf_format.load(str(folder))


@pytest.mark.parametrize("case", ["all", "relu2"])  # rotary, bigram and the rest; learned positions
def test_left_padded_prompts_generate_as_each_prompt_alone(case, exported, tokenizers):
    """A batch of prompts of different lengths, left-padded with an attention_mask, gives each
    prompt the greedy text and the logits it gets alone (remote code: positions per row,
    padding keys never seen, no bigram across the padding)."""
    tok = tokenizers["char"]
    model = transformers.AutoModelForCausalLM.from_pretrained(exported(case, "char") / "hf", trust_remote_code=True).eval()
    prompts = [tok.encode(p) for p in ("ROMEO:", "Second Citizen:", "O")]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
    for row, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):]
        assert torch.equal(out[row, width:], alone)
        with torch.no_grad():
            assert (padded[row, width - len(p):] - model(torch.tensor([p])).logits[0]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, attention_mask=mask[:, 1:])


@pytest.mark.parametrize("case", ["no_bias", "all"])
def test_a_pipeline_with_its_defaults_stops_at_the_context(case, exported):
    """transformers' text-generation pipeline asks for 256 new tokens by default, past a small
    model's context (an IndexError in GPT-2's position table, a ValueError in our code): the
    export's generation_config.json holds max_length = block_size, and generation stops there."""
    root = exported(case, "char")
    generation = json.loads((root / "hf" / "generation_config.json").read_text())
    assert generation["max_length"] == 32
    pipe = transformers.pipeline("text-generation", model=str(root / "hf"), trust_remote_code=case == "all")
    text = pipe(PROMPT, do_sample=False)[0]["generated_text"]
    assert text.startswith(PROMPT) and len(text) == 32  # a char model: one token a character


def test_the_tokenizer_pads_a_batch_of_prompts_for_generate(exported, tokenizers):
    """The recipe for batches (left padding, padding=True) works as written with the exported
    tokenizer of a model with a boundary token: its pad token is <|endoftext|>, and each row's
    greedy text is the one its prompt gets alone."""
    root = exported("all", "bpe")
    tok = transformers.AutoTokenizer.from_pretrained(root / "hf", trust_remote_code=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", trust_remote_code=True).eval()
    assert tok.pad_token == "<|endoftext|>" == tok.eos_token
    tok.padding_side = "left"
    prompts = ["ROMEO:", "the"]
    batch = tok(prompts, padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    width = batch.input_ids.shape[1]
    for row, prompt in enumerate(prompts):
        alone = model.generate(tok(prompt, return_tensors="pt").input_ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(out[row, width:], alone[0, alone.shape[1] - 6:])


def test_an_option_the_shipped_modeling_code_lacks_is_refused_not_exported_wrong(tmp_path, tokenizers, monkeypatch):
    """An option added to model.py but not yet to hf_remote/ (here: value_embeds, taken out of a
    copy of configuration_nanogpt.py) would export a folder transformers loads and computes
    without it: refused by name, nothing written."""
    import shutil
    remote = tmp_path / "hf_remote"
    shutil.copytree(hf_format.REMOTE_CODE, remote)
    code = (remote / "configuration_nanogpt.py").read_text(encoding="utf-8")
    (remote / "configuration_nanogpt.py").write_text(code.replace(" value_embeds=False,", ""), encoding="utf-8")
    monkeypatch.setattr(hf_format, "REMOTE_CODE", remote)
    tok = tokenizers["char"]
    args = dict(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, dropout=0.0, value_embeds=True)
    model = GPT(GPTConfig(**args))
    checkpoint.save({"model": model.state_dict(), "model_args": args, "optimizer": {}, "iter_num": 0,
                     "best_val_loss": float("inf"), "config": {}, "tokenizer": tok.describe()}, tmp_path / "out" / "ckpt.pt")
    with pytest.raises(UserError, match="the modeling code it ships .* does not know value_embeds=True"):
        export.main([f"--out_dir={tmp_path / 'out'}", f"--dest={tmp_path / 'hf'}"])
    assert not (tmp_path / "hf").exists()
    assert hf_format.remote_code_options(GPTConfig(**{**args, "value_embeds": False})) == []
