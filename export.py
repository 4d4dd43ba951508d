"""Export a trained model to a folder other runtimes load: Hugging Face transformers, ONNX, GGUF.

    python export.py --out_dir=out-shakespeare-cpu --format=hf --dest=exports/shakespeare-hf
    python export.py --out_dir=out-shakespeare-cpu --format=onnx --dest=exports/shakespeare-onnx
    python export.py --out_dir=out-shakespeare-ft-cpu --format=gguf --dest=exports/shakespeare-gguf

hf:   config.json (GPT2Config), model.safetensors (GPT-2's layout), generation_config.json,
      tokenizer.json + tokenizer_config.json, README.md (the model card). Loads with
      transformers.AutoModelForCausalLM / AutoTokenizer.from_pretrained(dest), offline.
onnx: model.onnx (input_ids (batch, sequence) int64 -> logits (batch, sequence, vocab)),
      model_with_past.onnx (the same plus past_key_values.N.key/value -> present.N.key/value,
      for fast generation), config.json, tokenizer.json, README.md. Runs with onnxruntime and
      tokenizers alone.
gguf: model.gguf (llama.cpp's gpt2 architecture, float32, the tokenizer inside) and README.md,
      for GPT-2 BPE models; runs with llama.cpp (e.g. the xllamacpp wheel).

Everything comes from <out_dir>/ckpt.pt. The folder is written beside dest under a temporary
name and renamed into place when complete, so an interrupted export leaves no half folder. A
dest that exists is replaced only if it is an export of ours (or with --force).
The weight mapping and the tokenizer.json builder live in hf_format.py.
"""
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

import hf_format
from config import parse_config
from errors import UserError, run_main
from hf_format import require
from loading import load_model
from model import GPT
from tokenizer import Tokenizer

FORMATS = ("hf", "onnx", "gguf")
EXTRAS = {"hf": ("transformers", "safetensors", "tokenizers"), "onnx": ("onnx", "onnxruntime", "tokenizers"),
          "gguf": ("gguf", "tokenizers")}
MARKER = "exported_by: nanogpt-toolkit export.py"  # in the model card: how we know a folder is ours


@dataclass
class ExportConfig:
    """Settings of export.py."""
    out_dir: str = "out"  # folder holding ckpt.pt, written by train.py
    format: str = "hf"  # hf (Hugging Face transformers folder), onnx (onnxruntime + tokenizers folder) or gguf (llama.cpp, GPT-2 BPE models)
    dest: str = ""  # folder to write; empty = exports/<out_dir's name>-<format>
    force: bool = False  # replace dest even if it is not a folder export.py wrote

    def problems(self) -> list[str]:
        p = []
        if self.format not in FORMATS:
            p.append(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not self.out_dir:
            p.append("--out_dir must name the folder holding ckpt.pt")
        return p


# ---------------------------------------------------------------------------- the model card

# Greedy generation with onnxruntime and the KV cache; the README shows the same loop, and
# tests/test_export.py runs it.
ONNX_LOOP = """# greedy generation with onnxruntime and the KV cache, no torch
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
folder, prompt, max_new_tokens = {folder}, "ROMEO:", 100
tokenizer = Tokenizer.from_file(f"{{folder}}/tokenizer.json")
session = ort.InferenceSession(f"{{folder}}/model_with_past.onnx")
past_names = [i.name for i in session.get_inputs()[1:]]  # past_key_values.N.key/value
_, heads, _, head_size = session.get_inputs()[1].shape  # (batch, heads, positions, head size)
past = {{name: np.zeros((1, heads, 0, head_size), np.float32) for name in past_names}}
ids = np.array([tokenizer.encode(prompt).ids], dtype=np.int64)  # the prompt, then one token a step
new = []
for _ in range(max_new_tokens):  # prompt + new tokens must fit in n_positions (config.json)
    logits, *present = session.run(None, {{"input_ids": ids, **past}})
    ids = logits[:, -1:].argmax(-1)  # greedy: (1, 1), int64; sample from softmax(logits) for variety
    past = dict(zip(past_names, present))
    new.append(int(ids[0, 0]))
print(prompt + tokenizer.decode(new))
"""


def model_card(model: GPT, tokenizer: Tokenizer, ckpt: dict, fmt: str, name: str) -> str:
    c, cfg = model.config, ckpt.get("config", {})
    tok = (f"char-level, {len(tokenizer.chars)} characters" if tokenizer.name == "char"
           else f"tiktoken {tokenizer.name} BPE, {tokenizer.vocab_size:,} tokens")
    start = cfg.get("init_from", "scratch")
    origin = "trained" if start in ("scratch", "resume") else f"finetuned from {start}"
    best = ckpt.get("best_val_loss")
    best = f"{best:.4f}" if isinstance(best, float) and best != float("inf") else "not measured"
    if fmt == "hf":
        use = f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=100, do_sample=True, top_k=200, temperature=0.8)
print(tokenizer.decode(out[0]))
```

Or continue training it: `python train.py --init_from={name} ...` in nanogpt-toolkit."""
    elif fmt == "gguf":
        use = f"""With llama.cpp: `llama-cli -m {name}/model.gguf -p "ROMEO:" -n 100`, or from Python with xllamacpp:

```python
import xllamacpp as xlc
params = xlc.CommonParams()
params.model.path = "{name}/model.gguf"
server = xlc.Server(params)
print(server.handle_completions({{"prompt": "ROMEO:", "max_tokens": 100}})["choices"][0]["text"])
```

llama.cpp computes GPT-2's tanh GELU; a model trained with the exact GELU (activation gelu above)
gets slightly different logits there (greedy text matched ours in our tests)."""
    else:
        use = ("`model.onnx` maps `input_ids` (int64, batch x sequence) to `logits`; "
               "`model_with_past.onnx` also takes and returns the KV cache (`past_key_values.N.key/value` "
               "-> `present.N.key/value`, each batch x heads x positions x head size) for fast generation "
               "with onnxruntime and tokenizers alone:\n\n```python\n" + ONNX_LOOP.format(folder=json.dumps(name)) + "```")
    return f"""---
library_name: {dict(hf="transformers").get(fmt, fmt)}
pipeline_tag: text-generation
tags: [gpt2, nanogpt-toolkit]
{MARKER}
---
# {name}

A GPT-2-architecture language model {origin} with nanogpt-toolkit, a nanoGPT-style trainer, and
exported by its `export.py` ({fmt} format).

| | |
|---|---|
| parameters | {model.num_params(non_embedding=False):,} ({model.num_params() / 1e6:.2f}M without position embeddings) |
| shape | {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, context {c.block_size} tokens, {c.activation} MLP, biases {"yes" if c.bias else "no (exported as zeros)"} |
| tokenizer | {tok} |
| dataset | {cfg.get("dataset", "unknown")} |
| iterations | {ckpt.get("iter_num", "unknown")} |
| best validation loss | {best} |

## How to use

{use}

## Training config

```json
{json.dumps(cfg, indent=1, sort_keys=True)}
```
"""


# ---------------------------------------------------------------------------- formats

def write_tokenizer(tokenizer: Tokenizer, block_size: int, folder: Path):
    hf_format.hf_tokenizer(tokenizer).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(hf_format.tokenizer_config(tokenizer, block_size), indent=2) + "\n")


def write_hf(model: GPT, tokenizer: Tokenizer, folder: Path):
    """config.json, model.safetensors, generation_config.json through transformers itself."""
    transformers = require("transformers", "--format=hf")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = transformers.GPT2Config(**hf_format.hf_config_dict(model.config, tokenizer))
    hf = transformers.GPT2LMHeadModel(config)
    hf.load_state_dict(hf_format.to_hf_state_dict(model))
    hf.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(tokenizer, model.config.block_size, folder)


def forward_with_past(model: GPT, input_ids, past: list | None):
    """GPT.forward for ONNX: logits at every position, and the cache as explicit tensors.

    input_ids (B, T) continue `past`, [k0, v0, k1, v1, ...] each (B, nh, P, hs) (None: P = 0).
    Returns logits (B, T, vocab) and the presents, each (B, nh, P + T, hs). The mask is built
    from positions, not from Python numbers, so the traced graph holds for any P and T."""
    B, T = input_ids.shape
    P = past[0].shape[2] if past else 0
    tr = model.transformer
    pos = torch.arange(P, P + T, device=input_ids.device)  # (T,)
    mask = torch.arange(P + T, device=input_ids.device)[None, :] <= pos[:, None]  # (T, P + T): causal
    x = tr.wte(input_ids) + tr.wpe(pos)
    presents = []
    for i, block in enumerate(tr.h):
        attn, C, nh = block.attn, block.attn.n_embd, block.attn.n_head
        q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if past:
            k, v = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)
        presents += [k, v]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(tr.ln_f(x)), presents


class Logits(nn.Module):
    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return forward_with_past(self.model, input_ids, None)[0]


class LogitsWithPast(Logits):
    def forward(self, input_ids, *past):
        logits, presents = forward_with_past(self.model, input_ids, list(past))
        return (logits, *presents)


ONNX_INLINE_BYTES = 1.8e9  # weights above this go to a .data file beside the graph (protobuf stops at 2 GB)


def export_onnx(module: nn.Module, args: tuple, path: Path, inline: bool, **names_and_axes):
    """torch.onnx.export into a scratch folder (a large model comes out as one file per tensor),
    then the graph at path: weights inside, or all in one path.data file beside it."""
    import onnx
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        raw = Path(scratch) / path.name
        # TorchScript exporter (dynamo=False): the dynamo one gives the same graphs here but
        # took 25 s instead of 1 s for a 2-layer model
        torch.onnx.export(module, args, str(raw), dynamo=False, **names_and_axes)
        if inline:
            os.replace(raw, path)
        else:
            onnx.save_model(onnx.load(str(raw)), str(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=path.name + ".data")
    onnx.checker.check_model(str(path))


def write_onnx(model: GPT, tokenizer: Tokenizer, folder: Path):
    """model.onnx and model_with_past.onnx, checked with onnx.checker."""
    c = model.config
    inline = sum(p.numel() for p in model.parameters()) * 4 <= ONNX_INLINE_BYTES
    ids = torch.zeros(2, 3, dtype=torch.long)
    past = [torch.zeros(2, c.n_head, 2, c.n_embd // c.n_head) for _ in range(2 * c.n_layer)]
    names = [f"past_key_values.{i}.{kv}" for i in range(c.n_layer) for kv in ("key", "value")]
    presents = [n.replace("past_key_values", "present") for n in names]
    tokens = {0: "batch", 1: "sequence"}
    export_onnx(Logits(model), (ids,), folder / "model.onnx", inline, input_names=["input_ids"],
                output_names=["logits"], dynamic_axes={"input_ids": tokens, "logits": tokens})
    export_onnx(LogitsWithPast(model), (ids, *past), folder / "model_with_past.onnx", inline,
                input_names=["input_ids", *names], output_names=["logits", *presents],
                dynamic_axes={"input_ids": tokens, "logits": tokens,
                              **{n: {0: "batch", 2: "past_sequence"} for n in names},
                              **{n: {0: "batch", 2: "total_sequence"} for n in presents}})
    (folder / "config.json").write_text(json.dumps(hf_format.hf_config_dict(c, tokenizer), indent=2) + "\n")
    write_tokenizer(tokenizer, c.block_size, folder)


# GGUF tensor names of llama.cpp's gpt2 architecture (as its convert_hf_to_gguf.py writes them)
GGUF_MODULES = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
                "transformer.ln_f": "output_norm", "lm_head": "output"}
GGUF_BLOCK_MODULES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                      "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
GGUF_TOKENIZERS = {"gpt2": "gpt-2", "r50k_base": "gpt-2"}  # tiktoken name -> llama.cpp pre-tokenizer, verified


def gguf_name(name: str) -> str:
    """transformer.h.3.attn.c_attn.weight -> blk.3.attn_qkv.weight"""
    module, kind = name.rsplit(".", 1)
    if module in GGUF_MODULES:
        return f"{GGUF_MODULES[module]}.{kind}"
    _, _, layer, sub = module.split(".", 3)
    return f"blk.{layer}.{GGUF_BLOCK_MODULES[sub]}.{kind}"


def check_gguf(tokenizer: Tokenizer):
    if tokenizer.name not in GGUF_TOKENIZERS:
        raise UserError(f"--format=gguf takes GPT-2 BPE models (tokenizer gpt2) only: llama.cpp has no "
                        f"char-level vocabulary, and its pre-tokenizer for {tokenizer.name!r} is not verified "
                        f"here; use --format=hf or --format=onnx")
    require("gguf", "--format=gguf")


def write_gguf(model: GPT, tokenizer: Tokenizer, folder: Path):
    """model.gguf for llama.cpp (architecture gpt2, float32), the tokenizer inside it."""
    check_gguf(tokenizer)
    gguf = require("gguf", "--format=gguf")
    c = model.config
    writer = gguf.GGUFWriter(str(folder / "model.gguf"), "gpt2")
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(4 * c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_head_count(c.n_head)
    writer.add_layer_norm_eps(hf_format.LAYER_NORM_EPS)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # the vocabulary and merges of our tokenizer.json, in GGUF's byte-level BPE form
    fast = json.loads(hf_format.hf_tokenizer(tokenizer).to_str())
    vocab = fast["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), c.vocab_size)]  # a model wider than its tokenizer
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GGUF_TOKENIZERS[tokenizer.name])
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i == tokenizer.eot_id else
                            gguf.TokenType.UNUSED if i >= tokenizer.vocab_size else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in fast["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)  # our prompts start with their own text, as in sample.py
    # GPT-2's tensors with their biases (zeros for a bias-free model), back in nn.Linear layout
    for name, tensor in hf_format.to_hf_state_dict(model).items():
        if name.endswith(hf_format.CONV1D):
            tensor = tensor.t()
        writer.add_tensor(gguf_name(name), tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


WRITERS = {"hf": write_hf, "onnx": write_onnx, "gguf": write_gguf}


# ---------------------------------------------------------------------------- the destination

def is_our_export(dest: Path) -> bool:
    card = dest / "README.md"
    try:
        return card.is_file() and MARKER in card.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def check_destination(dest: Path, force: bool):
    if not dest.exists():
        return
    if dest.is_dir() and (is_our_export(dest) or not any(dest.iterdir())):
        return
    if force:
        return
    what = "a file" if not dest.is_dir() else "a folder that export.py did not write"
    raise UserError(f"--dest={dest} is {what}; refusing to replace it. Choose another --dest, or pass "
                    f"--force to replace it")


def fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(dest: Path, write):
    """write(tmp) fills a temporary folder beside dest, which then takes dest's place."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")  # the previous dest, until the new one is in place
    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]  # deepest first

    def clean_up():
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        for folder in created:  # the folders made for dest, if they are still empty
            try:
                folder.rmdir()
            except OSError:
                break

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write --dest={dest}: {e.strerror or e}; choose a folder you can write to") from None
    try:
        write(tmp)
        for path in [*tmp.rglob("*"), tmp]:  # every file on disk before the folder takes dest's place
            if path.is_file():
                path.chmod(0o644)  # some writers create files readable by their owner only
            fsync(path)
        if dest.exists() or dest.is_symlink():
            os.replace(dest, old)
        os.replace(tmp, dest)
        fsync(dest.parent)  # make the rename itself durable
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    except OSError as e:
        clean_up()
        raise UserError(f"could not write --dest={dest}: {e.strerror or e}; free some disk space or choose "
                        f"another --dest (nothing was replaced)") from None
    except BaseException:
        clean_up()
        raise


def main(argv=None):
    cfg, _ = parse_config(ExportConfig, argv, prog="export.py")
    for module in EXTRAS[cfg.format]:  # a missing extra is one line, before any work
        require(module, f"--format={cfg.format}")
    dest = Path(cfg.dest or f"exports/{Path(cfg.out_dir).resolve().name}-{cfg.format}")
    if dest.resolve() in (Path(cfg.out_dir).resolve(), *Path(cfg.out_dir).resolve().parents):
        raise UserError(f"--dest={dest} holds the checkpoint folder --out_dir={cfg.out_dir}, which an export "
                        f"would replace; choose a --dest outside it")
    check_destination(dest, cfg.force)
    model, tokenizer, ckpt = load_model(cfg.out_dir, "cpu")
    model.float()
    if options := model.config.non_gpt2_options():  # every format here is GPT-2's architecture
        raise UserError(f"{cfg.out_dir} was trained with options GPT-2 does not have ({', '.join(options)}); "
                        f"--format={cfg.format} can only express GPT-2's architecture, so nothing was written. "
                        f"Sample it with sample.py, or train without these options to export")
    if cfg.format == "gguf":  # before anything is written
        check_gguf(tokenizer)
    card = model_card(model, tokenizer, ckpt, cfg.format, str(dest))

    def write(folder: Path):
        WRITERS[cfg.format](model, tokenizer, folder)
        (folder / "README.md").write_text(card, encoding="utf-8")

    write_atomically(dest, write)
    files = ", ".join(sorted(p.name for p in dest.iterdir()))
    print(f"wrote {dest} ({files})", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
