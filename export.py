"""Export a trained model to a folder other runtimes load: Hugging Face transformers, ONNX, GGUF.

    python export.py --out_dir=out-shakespeare-cpu --format=hf --dest=exports/shakespeare-hf
    python export.py --out_dir=out-shakespeare-cpu --format=onnx --dest=exports/shakespeare-onnx
    python export.py --out_dir=out-shakespeare-ft-cpu --format=gguf --dest=exports/shakespeare-gguf

hf:   a model GPT-2's architecture expresses (GPTConfig.non_gpt2_options() empty) becomes a plain
      GPT2LMHeadModel folder: config.json (GPT2Config), model.safetensors (GPT-2's layout),
      generation_config.json. Any other model (rotary, rmsnorm, relu2, qk_norm, an untied head,
      bigram, x0_lambdas, value_embeds) becomes a folder of model_type "nanogpt" that transformers
      loads with trust_remote_code=True: config.json (our GPTConfig fields and auto_map),
      model.safetensors (our own state dict), and configuration_nanogpt.py + modeling_nanogpt.py
      copied from hf_remote/. Both carry tokenizer.json + tokenizer_config.json and README.md (the
      model card) and load with transformers.AutoModelForCausalLM / AutoTokenizer, offline.
onnx: model.onnx (model.py's GPT.forward traced: input_ids (batch, sequence) int64 -> logits
      (batch, sequence, vocab)), model_with_past.onnx (the same plus the KV cache,
      past_key_values.N.key/value -> present.N.key/value, for fast generation; a bigram model
      also carries its past tokens, past_input_ids -> present_input_ids), config.json,
      tokenizer.json, README.md. Runs with onnxruntime and tokenizers alone, for every model.
gguf: model.gguf (llama.cpp's gpt2 architecture, or gptneox for rotary positions; float32, the
      tokenizer inside) and README.md, for GPT-2 BPE models whose architecture llama.cpp computes
      (GPT-2's, with rotary positions, an untied head, no biases); any other is refused in one
      line naming what llama.cpp lacks.

Everything comes from <out_dir>/ckpt.pt. The folder is written beside dest under a temporary
name and renamed into place when complete, so an interrupted export leaves no half folder. A
dest that exists is replaced only if it is an export of ours (or with --force); files a user added
to an export are carried over, and one the new export would overwrite is refused (or --force).
The weight mapping and the tokenizer.json builder live in hf_format.py.
"""
import errors
errors.starting(__name__)  # a missing requirement or a Ctrl-C while torch imports: one line, no traceback
import gc
import hashlib
gc.disable()  # no garbage collection while torch imports: start-up and exit ~0.3 s faster (docs/speed.md)
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.onnx import symbolic_helper

import checkpoint
import durable
import hf_format
import runlock
from config import parse_config
from errors import UserError, listed, quoted, run_main
from generation import example_prompt
from hf_format import require
from loading import load_model
from model import GPT, apply_rotary
import template
from tokenizer import Tokenizer
gc.freeze()  # what the imports made is never traversed again, not even at exit
gc.enable()

FORMATS = ("hf", "onnx", "gguf")
EXTRAS = {"hf": ("transformers", "safetensors", "tokenizers"), "onnx": ("onnx", "onnxruntime", "tokenizers"),
          "gguf": ("gguf", "tokenizers")}
MARKER = hf_format.EXPORT_MARKER  # in the model card: how we know a folder is ours
EXPORTED_FILES = "exported_files"  # the card's list of what the export wrote (users_files keeps the rest)


@dataclass
class ExportConfig:
    """Settings of export.py."""
    out_dir: str = "out"  # folder holding ckpt.pt, written by train.py
    format: str = "hf"  # hf (Hugging Face transformers folder), onnx (onnxruntime + tokenizers folder) or gguf (llama.cpp, GPT-2 BPE models)
    dest: str = ""  # folder to write; empty = exports/<out_dir's name>-<format>
    force: bool = False  # replace dest even if it is not a folder export.py wrote, or a file you added to one
    repo_id: str = ""  # --format=hf: the Hub repository (USER/NAME) you will upload dest to; the card loads it from there

    def problems(self) -> list[str]:
        p = []
        if self.format not in FORMATS:
            p.append(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not self.out_dir:
            p.append("--out_dir must name the folder holding ckpt.pt")
        part = r"(?![.-])(?!.*(?:--|\.\.))[\w.-]+(?<![.-])"  # the Hub's rule for a user's and a repository's name
        if self.repo_id and not re.fullmatch(f"{part}/{part}", self.repo_id):
            p.append(f"--repo_id must be a Hub repository's USER/NAME, got {self.repo_id!r}")
        if self.repo_id and self.format != "hf":
            p.append(f"--repo_id is for --format=hf (transformers loads a model by its Hub id); a {self.format} "
                     f"folder is read from disk: upload it as it is, and download it with `hf download REPO --local-dir DIR`")
        return p


# ---------------------------------------------------------------------------- the model card

NEW_TOKENS = 100  # what the card's snippets ask for, where the context holds them


def card_prompt(tokenizer: Tokenizer, block_size: int, instruct: dict | None = None) -> tuple[str, int]:
    """The prompt and the number of new tokens the card's snippets use: generation.example_prompt
    and NEW_TOKENS where the model takes them (a char vocabulary without ROMEO:'s characters gets
    one character of its own: an unknown one encodes to nothing), a short context a shorter
    prompt; and no more new tokens than the context holds after the prompt: neither transformers'
    generate() nor the ONNX loop crops the context, so one position past block_size is an
    IndexError. (An instruction model's prompt is a question, wrapped in its template.)"""
    if instruct:  # the snippets ask a question (a shorter one, for a short context) through the template
        for question in dict.fromkeys((example_prompt(tokenizer, instruct), "2+2?", "?")):
            used = len(template.prompt_ids(tokenizer, instruct["template"], question, drop_unknown=True))
            if used < block_size:
                break
        return question, max(1, min(NEW_TOKENS, block_size - used))
    own = example_prompt(tokenizer)
    candidates = [own, own[0]] + ([""] if tokenizer.documents else [])  # a document may start from nothing
    for prompt in candidates:
        used = len(tokenizer.encode(prompt)) + (1 if tokenizer.documents else 0)  # + <|endoftext|>
        if used < block_size:
            break
    # the last new token is never fed back: one always fits, however long the prompt
    return prompt, max(1, min(NEW_TOKENS, block_size - used))


# Greedy generation with onnxruntime and the KV cache, for every model; docs/export.md shows the
# same loop, and tests/test_export.py runs it. {start} and {stop} differ for a documents model.
ONNX_LOOP = """# greedy generation with onnxruntime and the KV cache, no torch
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
folder, prompt, max_new_tokens = {folder}, {prompt}, {max_new_tokens}
tokenizer = Tokenizer.from_file(f"{{folder}}/tokenizer.json")
session = ort.InferenceSession(f"{{folder}}/model_with_past.onnx")
# an empty cache: past_key_values.N.key/value (batch, heads, 0, head size), and for a model
# with the bigram option past_input_ids (batch, 0)
past = {{i.name: np.zeros([1 if d == "batch" else 0 if d == "past_sequence" else d for d in i.shape],
                         np.int64 if i.type == "tensor(int64)" else np.float32)
        for i in session.get_inputs()[1:]}}
{start}
new = []
for _ in range(max_new_tokens):  # prompt + new tokens must fit in block_size (config.json)
    logits, *present = session.run(None, {{"input_ids": ids, **past}})
    ids = logits[:, -1:].argmax(-1)  # greedy: (1, 1), int64; sample from softmax(logits) for variety
{stop}    past = dict(zip(past, present))
    new.append(int(ids[0, 0]))
{show}"""
ONNX_START = "ids = np.array([tokenizer.encode(prompt).ids], dtype=np.int64)  # the prompt, then one token a step"
ONNX_START_DOCUMENT = ("ids = np.array([[{eot}] + tokenizer.encode(prompt.lstrip(\"\\n\")).ids], dtype=np.int64)  "
                       "# a new document: <|endoftext|>, the prompt")
ONNX_STOP_DOCUMENT = "    if ids[0, 0] == {eot}:  # <|endoftext|>: the document ended\n        break\n"
ONNX_SHOW = "print(prompt + tokenizer.decode(new))\n"
# an instruction model: the prompt wrapped as training wrapped it (tokenizer_config.json's
# chat_template, one user turn), the answer alone shown, cut where it ends
ONNX_START_INSTRUCT = ("text = {user}.replace(\"{{content}}\", prompt) + {assistant}  # the template's user turn, "
                       "the answer's marker\nids = np.array([[{eot}] + tokenizer.encode(text).ids], dtype=np.int64)")
ONNX_STOP_INSTRUCT = ("    if ids[0, 0] == {eot}:  # <|endoftext|>: the answer ended\n        break\n"
                      "    if any(s in tokenizer.decode(new) for s in {stops}):  # a chat turn's end marker\n"
                      "        break\n")
ONNX_SHOW_INSTRUCT = "answer = tokenizer.decode(new)\nfor s in {stops}:\n    answer = answer.split(s)[0]\nprint(answer)\n"


def literal(text: str) -> str:
    """text as a Python string literal in double quotes (json's escapes are Python's too)."""
    return json.dumps(text, ensure_ascii=False)


def onnx_loop(folder: str, tokenizer: Tokenizer, prompt: str = "ROMEO:", max_new_tokens: int = NEW_TOKENS,
              instruct: dict | None = None) -> str:
    """ONNX_LOOP for this model, reading the folder at the path folder."""
    eot, show = tokenizer.eot_id, ONNX_SHOW
    if instruct:
        tmpl = instruct["template"]
        stops = "[" + ", ".join(map(literal, template.stop_strings(tmpl))) + "]"
        start = ONNX_START_INSTRUCT.format(user=literal(tmpl["user"]), assistant=literal(tmpl["assistant"]), eot=eot)
        stop, show = ONNX_STOP_INSTRUCT.format(eot=eot, stops=stops), ONNX_SHOW_INSTRUCT.format(stops=stops)
    elif tokenizer.documents is not None:
        start, stop = ONNX_START_DOCUMENT.format(eot=eot), ONNX_STOP_DOCUMENT.format(eot=eot)
    else:
        start, stop = ONNX_START, ""
    return ONNX_LOOP.format(folder=json.dumps(folder), prompt=literal(prompt), max_new_tokens=max_new_tokens,
                            start=start, stop=stop, show=show)


def hf_usage(name: str, model: GPT, tokenizer: Tokenizer, instruct: dict | None = None, repo_id: str = "") -> str:
    """The card's usage: transformers code loading name (the folder, or repo_id on the Hub), and
    our scripts' commands, which read a folder on disk."""
    remote = bool(model.config.non_gpt2_options())
    prompt, max_new_tokens = card_prompt(tokenizer, model.config.block_size, instruct)
    trust = ", trust_remote_code=True" if remote else ""
    more, shown = "", "out[0]"
    if instruct:  # trained on instruction records: the chat template wraps the prompt as training did
        ids = (f'ids = tokenizer.apply_chat_template([{{"role": "user", "content": {literal(prompt)}}}],\n'
               '                                    add_generation_prompt=True, return_tensors="pt", '
               'return_dict=True)["input_ids"]\n')
        more = f",\n                     stop_strings={json.dumps(template.stop_strings(instruct['template']))}, tokenizer=tokenizer"
        ends, shown = "the answer ends at <|endoftext|> or, in a chat, at the end marker", "out[0, ids.shape[1]:]"
    elif tokenizer.documents:
        ids = (f'ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer({literal(prompt)}).input_ids])  '
               '# a new document: <|endoftext|>, the prompt\n')
        ends = "generation ends with the document (<|endoftext|>)"
    else:
        ids = f'ids = tokenizer({literal(prompt)}, return_tensors="pt").input_ids\n'
        ends = "prompt + new tokens must fit in the context"
    code = ("import torch\n" if tokenizer.documents and not instruct else "") + (
            f"from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained({literal(repo_id or name)}{trust})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({literal(repo_id or name)}{trust})\n{ids}"
            f"out = model.generate(ids, max_new_tokens={max_new_tokens}, max_length=None, do_sample=True, top_k=200, "
            f"temperature=0.8{more})  # {ends}\n"
            f"print(tokenizer.decode({shown}, skip_special_tokens=True))\n")
    why = ("\n\nThe model uses options GPT-2's architecture lacks, so its code ships in this folder "
           "(`modeling_nanogpt.py`, `configuration_nanogpt.py`: plain PyTorch, read them before you trust "
           "them); `trust_remote_code=True` lets transformers run it (AutoTokenizer reads config.json too, "
           "so it asks for the same). generate() and its KV cache work as for any transformers model, "
           "batches of prompts too, left-padded with an attention_mask.") if remote else ""
    if tokenizer.documents and not instruct:  # the Hub's widget and pipeline() start no new document
        why += ("\n\nA document starts with <|endoftext|>, as above: transformers' text-generation pipeline "
                "does not put it before a prompt, so its text differs from the model's documents.")
    local = quoted(repo_id.split("/")[1] if repo_id else name)
    fetch = f"`hf download {repo_id} --local-dir {local}`, then " if repo_id else ""
    return (f"```python\n{code}```{why}\n\nOr continue training it: {fetch}`python train.py --init_from={local} ...` "
            f"in nanogpt-toolkit (or sample it: `python sample.py --init_from={local}`).")


def model_card(model: GPT, tokenizer: Tokenizer, ckpt: dict, fmt: str, name: str, repo_id: str = "") -> str:
    c, cfg = model.config, ckpt.get("config", {})
    tok = (f"char-level, {len(tokenizer.chars)} characters (the tokenizer drops any other character without a "
           f"word: check your text against tokenizer.json's vocabulary)" if tokenizer.name == "char"
           else f"tiktoken {tokenizer.name} BPE, {tokenizer.vocab_size:,} tokens" if tokenizer.name != "bpe"
           else f"byte-level BPE trained on the dataset, {tokenizer.vocab_size:,} tokens")
    if tokenizer.documents:
        tok += f"; documents mode ({tokenizer.documents}): <|endoftext|> (id {tokenizer.eot_id}) starts and ends each document"
    start = ckpt.get("started_from") or cfg.get("init_from", "scratch")  # (kept through resumes)
    origin = ("trained" if start == "scratch" else f"finetuned from {start}" if start != "resume" else
              "trained (its checkpoint does not record whether it started from a pretrained model)")
    if cfg.get("lora_rank"):  # the adapters are merged into the weights the export holds
        origin += (f" with LoRA (rank {cfg['lora_rank']} on {cfg.get('lora_targets', 'c_attn,c_proj')}, merged "
                   f"into the weights)")
    if instruct := ckpt.get("instruct"):
        origin += (" on instruction records (a question, then its answer" +
                   (", and chats" if instruct.get("chat") else "") + "), so a prompt goes through its template")
    best = checkpoint.val_loss_text(ckpt) or "not measured"
    options = c.non_gpt2_options()
    arch = f"GPT-2's architecture with {', '.join(options)}" if options else "GPT-2's architecture"
    gpt2_layout = fmt == "gguf" or (fmt == "hf" and not options)  # always has biases
    zeros = " (exported as zeros)" if gpt2_layout else ""
    shape = (f"{c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, context {c.block_size} tokens, "
             f"{c.activation} MLP, {c.norm}, {'rotary' if c.rotary else 'learned'} positions, "
             f"biases {'yes' if c.bias else 'no' + zeros}")
    instruct = ckpt.get("instruct") if fmt == "onnx" else None  # (hf_usage words the hf card's; llama.cpp, its chat mode)
    prompt, max_new_tokens = card_prompt(tokenizer, c.block_size, instruct)
    if fmt == "hf":
        use = hf_usage(name, model, tokenizer, ckpt.get("instruct"), repo_id)
    elif fmt == "gguf":
        use = f"""With llama.cpp: `llama-cli -m {quoted(name + '/model.gguf')} -p {literal(prompt)} -n {max_new_tokens}`, or from Python with xllamacpp:

```python
import xllamacpp as xlc
params = xlc.CommonParams()
params.model.path = {literal(name + '/model.gguf')}
server = xlc.Server(params)
print(server.handle_completions({{"prompt": {literal(prompt)}, "max_tokens": {max_new_tokens}}})["choices"][0]["text"])
```

llama.cpp computes GPT-2's tanh GELU; a model trained with the exact GELU (activation gelu above)
gets slightly different logits there (greedy text matched ours in our tests)."""
    else:
        use = ("`model.onnx` maps `input_ids` (int64, batch x sequence) to `logits`; "
               "`model_with_past.onnx` also takes and returns the KV cache (`past_key_values.N.key/value` "
               "-> `present.N.key/value`, each batch x heads x positions x head size; a bigram model also "
               "`past_input_ids` -> `present_input_ids`, the tokens so far) for fast generation "
               "with onnxruntime and tokenizers alone:\n\n```python\n" + onnx_loop(name, tokenizer, prompt, max_new_tokens, instruct)
               + "```")
    return f"""---
library_name: {dict(hf="transformers").get(fmt, fmt)}
pipeline_tag: text-generation
tags: [{"gpt2" if not options else "nanogpt"}, nanogpt-toolkit]
{MARKER}
---
# {repo_id or name}

A language model ({arch}) {origin} with nanogpt-toolkit, a nanoGPT-style trainer, and
exported by its `export.py` ({fmt} format).

| | |
|---|---|
| parameters | {model.num_params(non_embedding=False):,} ({model.num_params() / 1e6:.2f}M as nanoGPT counts them: without lookup-only tables such as positions) |
| shape | {shape} |
| tokenizer | {tok} |
| dataset | {cfg.get("dataset", "unknown")} |
| iterations | {ckpt.get("iter_num", "unknown")} |
| validation loss | {best} |

## How to use

{use}

## Training config

```json
{json.dumps(cfg, indent=1, sort_keys=True)}
```
"""


# ---------------------------------------------------------------------------- formats

def write_tokenizer(tokenizer: Tokenizer, block_size: int, folder: Path, instruct: dict | None = None):
    hf_format.hf_tokenizer(tokenizer).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(hf_format.tokenizer_config(tokenizer, block_size, instruct), indent=2) + "\n", encoding="utf-8")


def write_json(path: Path, data: dict):
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_hf_remote(model: GPT, tokenizer: Tokenizer, folder: Path):
    """A model GPT-2 cannot express: our config, our state dict and the modeling code that
    computes them, the layout transformers expects of a model outside the library."""
    from safetensors.torch import save_file
    for name in hf_format.REMOTE_FILES:
        shutil.copyfile(hf_format.REMOTE_CODE / name, folder / name)
    write_json(folder / "config.json", hf_format.nanogpt_config_dict(model.config, tokenizer))
    save_file(hf_format.nanogpt_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    eot = tokenizer.eot_id
    write_json(folder / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
                                                   "max_length": model.config.block_size})


def write_hf(model: GPT, tokenizer: Tokenizer, folder: Path, instruct: dict | None = None):
    """GPT-2's own folder through transformers itself, or ours with its modeling code."""
    if model.config.non_gpt2_options():
        write_hf_remote(model, tokenizer, folder)
    else:
        transformers = require("transformers", "--format=hf")
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        config = transformers.GPT2Config(**hf_format.hf_config_dict(model.config, tokenizer))
        hf = transformers.GPT2LMHeadModel(config)
        hf.load_state_dict(hf_format.to_hf_state_dict(model))
        hf.save_pretrained(folder, safe_serialization=True)
        generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
        write_json(folder / "generation_config.json", {**generation, "max_length": model.config.block_size})
    write_tokenizer(tokenizer, model.config.block_size, folder, instruct)


def forward_with_past(model: GPT, input_ids, past: list, past_ids=None):
    """GPT.forward with the KV cache as explicit tensors, for the ONNX graph with the cache.

    input_ids (B, T) continue `past`, [k0, v0, k1, v1, ...] each (B, nh, P, hs), P >= 0, and,
    for the bigram option, past_ids (B, P), the tokens so far. Returns logits (B, T, vocab) and
    the presents, each (B, nh, P + T, hs) (then (B, P + T) tokens for the bigram). Every step is
    model.py's module or function; positions and the mask come from tensor shapes, not Python
    numbers, so the traced graph holds for any P and T."""
    c, tr = model.config, model.transformer
    B, T = input_ids.shape
    P = past[0].shape[2]
    pos = torch.arange(P, P + T, device=input_ids.device)  # (T,)
    mask = torch.arange(P + T, device=input_ids.device)[None, :] <= pos[:, None]  # (T, P + T): causal
    x = tr.wte(input_ids)  # (B, T, C)
    rope = model.rotary(pos) if c.rotary else None
    if not c.rotary:
        x = x + tr.wpe(pos)
    extra = []
    if c.bigram:  # the token before each new one: the last past token, or vocab_size (none) at the start
        so_far = torch.cat([input_ids.new_full((B, 1), c.vocab_size), past_ids, input_ids], dim=1)  # (B, 1 + P + T)
        x = x + model.bigram(so_far[:, -T - 1:-1] * c.vocab_size + input_ids)
        extra = [so_far[:, 1:]]
    x0 = x
    presents = []
    for i, block in enumerate(tr.h):
        attn, C, nh = block.attn, c.n_embd, c.n_head
        if c.x0_lambdas:
            x = block.lambdas[0] * x + block.lambdas[1] * x0
        q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=2)
        if c.value_embeds:
            v = v + model.value_embeds[i](input_ids)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if c.qk_norm:
            q, k = F.rms_norm(q, (C // nh,)), F.rms_norm(k, (C // nh,))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        k, v = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)
        presents += [k, v]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(tr.ln_f(x)), presents + extra


class Logits(nn.Module):
    """model.py's GPT.forward itself: with targets it returns the logits of every position (the
    loss it also computes feeds no output, so the exporter drops it)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, torch.zeros_like(input_ids))[0]


class LogitsWithPast(Logits):
    def forward(self, input_ids, *past):
        n = 2 * self.model.config.n_layer
        logits, presents = forward_with_past(self.model, input_ids, list(past[:n]), *past[n:])
        return (logits, *presents)


def rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """aten::rms_norm, which the TorchScript ONNX exporter lacks, in plain ONNX operators:
    x / sqrt(mean(x^2 over the last dims) + eps) (* weight), as torch computes it."""
    node = normalized_shape.node()
    dims = (len(list(node.inputs())) if node.kind() == "prim::ListConstruct"
            else len(symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")))
    eps = (torch.finfo(torch.float32).eps if symbolic_helper._is_none(eps)  # torch's default
           else symbolic_helper._get_const(eps, "f", "eps"))
    axes = g.op("Constant", value_t=torch.arange(-dims, 0))
    mean_square = g.op("ReduceMean", g.op("Mul", x, x), axes, keepdims_i=1)
    eps = g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))
    y = g.op("Mul", x, g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean_square, eps))))
    return y if symbolic_helper._is_none(weight) else g.op("Mul", y, weight)


ONNX_OPSET = 18
ONNX_INLINE_BYTES = 1.8e9  # weights above this go to a .data file beside the graph (protobuf stops at 2 GB)


def export_onnx(module: nn.Module, args: tuple, path: Path, inline: bool, **names_and_axes):
    """torch.onnx.export into a scratch folder (a large model comes out as one file per tensor),
    then the graph at path: weights inside, or all in one path.data file beside it."""
    import onnx
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", rms_norm_symbolic, ONNX_OPSET)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        raw = Path(scratch) / path.name
        # TorchScript exporter (dynamo=False): the dynamo one gives the same graphs here, many
        # times slower (docs/export.md has the figures)
        torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=ONNX_OPSET, **names_and_axes)
        if inline:
            os.replace(raw, path)
        else:
            onnx.save_model(onnx.load(str(raw)), str(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=path.name + ".data")
    onnx.checker.check_model(str(path))


def write_onnx(model: GPT, tokenizer: Tokenizer, folder: Path, instruct: dict | None = None):
    """model.onnx and model_with_past.onnx, checked with onnx.checker."""
    c = model.config
    inline = sum(p.numel() for p in model.parameters()) * 4 <= ONNX_INLINE_BYTES
    # the traced examples: 3 tokens, and 3 after 2 cached ones, or fewer in a short context (a
    # position past block_size indexes no table, learned or rotary); any length runs after it
    cached = min(2, c.block_size // 2)
    ids = torch.zeros(2, min(3, c.block_size), dtype=torch.long)
    new_ids = torch.zeros(2, min(3, c.block_size - cached), dtype=torch.long)  # after the cached ones
    past = [torch.zeros(2, c.n_head, cached, c.n_embd // c.n_head) for _ in range(2 * c.n_layer)]
    names = [f"past_key_values.{i}.{kv}" for i in range(c.n_layer) for kv in ("key", "value")]
    if c.bigram:
        past.append(torch.zeros(2, cached, dtype=torch.long))
        names.append("past_input_ids")
    presents = [n.replace("past_key_values", "present").replace("past_input_ids", "present_input_ids") for n in names]
    tokens = {0: "batch", 1: "sequence"}
    export_onnx(Logits(model), (ids,), folder / "model.onnx", inline, input_names=["input_ids"],
                output_names=["logits"], dynamic_axes={"input_ids": tokens, "logits": tokens})
    sequence_axis = {n: 1 if n.endswith("input_ids") else 2 for n in names + presents}
    export_onnx(LogitsWithPast(model), (new_ids, *past), folder / "model_with_past.onnx", inline,
                input_names=["input_ids", *names], output_names=["logits", *presents],
                dynamic_axes={"input_ids": tokens, "logits": tokens,
                              **{n: {0: "batch", sequence_axis[n]: "past_sequence"} for n in names},
                              **{n: {0: "batch", sequence_axis[n]: "total_sequence"} for n in presents}})
    config = (hf_format.nanogpt_config_dict(c, tokenizer) if c.non_gpt2_options()
              else hf_format.hf_config_dict(c, tokenizer))
    config.pop("auto_map", None)  # no modeling code in an ONNX folder
    write_json(folder / "config.json", config)
    write_tokenizer(tokenizer, c.block_size, folder, instruct)


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


# What llama.cpp lacks for each option beyond GPT-2 (GPTConfig.non_gpt2_options' names). Its gpt2
# architecture has an untied head (the output tensor), and its gptneox architecture is GPT-2's
# block with rotary positions (LayerNorm, biases, a GELU MLP, sequential residuals when
# use_parallel_residual is false), so neither option is missing.
GGUF_EXPRESSES = ("rotary", "tie_head")
GGUF_LACKS = {"activation": "a relu(x)^2 MLP with GPT-2's blocks", "norm": "parameter-free RMSNorm with GPT-2's blocks",
              "qk_norm": "RMSNorm of each head's queries and keys", "bigram": "a bigram embedding table",
              "x0_lambdas": "blocks mixing in the first block's input (x0_lambdas)",
              "value_embeds": "value embeddings added to attention's values"}


def check_gguf(model: GPT, tokenizer: Tokenizer):
    """Refuse, before anything is written, a model llama.cpp cannot run exactly, naming all it lacks."""
    lacks = []
    if tokenizer.name == "char":
        lacks.append("a char-level vocabulary")
    elif tokenizer.name not in GGUF_TOKENIZERS:
        lacks.append(f"a pre-tokenizer verified here to split text as {tokenizer.name!r} does")
    options = [o.partition("=")[0] for o in model.config.non_gpt2_options()]
    lacks += [GGUF_LACKS.get(o, f"the option {o}") for o in options if o not in GGUF_EXPRESSES]
    if lacks:
        raise UserError(f"--format=gguf takes GPT-2 BPE models (tokenizer gpt2) only, of an architecture "
                        f"llama.cpp computes; for this model llama.cpp lacks {'; '.join(lacks)}. Use "
                        f"--format=hf or --format=onnx (nothing was written)")
    require("gguf", "--format=gguf")


def gguf_tensors(model: GPT):
    """(GGUF name, float32 array) of every weight: GPT-2's tensors with their biases (zeros for a
    bias-free model) in nn.Linear layout. For rotary, llama.cpp's NEOX rope rotates each pair
    (i, i + hs/2) by +angle where apply_rotary rotates by -angle; negating the second half of
    every head's queries and keys makes the two agree (q . k is unchanged, values untouched)."""
    c = model.config
    hs = c.n_embd // c.n_head
    flip = torch.ones(c.n_head, 2, hs // 2)
    flip[:, 1] = -1
    flip = torch.cat([flip.flatten(), flip.flatten(), torch.ones(c.n_embd)])  # (3C,): q, k, v rows
    for name, tensor in hf_format.to_hf_state_dict(model).items():
        if name.endswith(hf_format.CONV1D):
            tensor = tensor.t()
        if c.rotary and name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            tensor = tensor * (flip[:, None] if tensor.dim() == 2 else flip)
        yield gguf_name(name), tensor.contiguous().numpy()


def write_gguf(model: GPT, tokenizer: Tokenizer, folder: Path, instruct: dict | None = None):
    """model.gguf for llama.cpp (architecture gpt2, or gptneox for rotary; float32), the tokenizer inside it."""
    check_gguf(model, tokenizer)
    gguf = require("gguf", "--format=gguf")
    c = model.config
    writer = gguf.GGUFWriter(str(folder / "model.gguf"), "gptneox" if c.rotary else "gpt2")
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(4 * c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_head_count(c.n_head)
    writer.add_layer_norm_eps(hf_format.LAYER_NORM_EPS)
    if c.rotary:  # model.py's Rotary: every channel of a head, base 10000
        writer.add_rope_dimension_count(c.n_embd // c.n_head)
        writer.add_rope_freq_base(10000.0)
        writer.add_parallel_residual(False)
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
    if instruct:  # llama.cpp formats chats with it (--jinja)
        writer.add_chat_template(template.chat_template(instruct["template"]))
    for name, array in gguf_tensors(model):
        writer.add_tensor(name, array)
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


TEXT_SUFFIXES = (".json", ".md", ".py", ".txt")  # hashed with CRLF as LF: a git checkout on Windows changes no file


def file_sha256(path: Path) -> str:
    if path.suffix.lower() in TEXT_SUFFIXES:
        return hashlib.sha256(path.read_bytes().replace(b"\r\n", b"\n")).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_sha256(text: str) -> str:
    """The card's sha256 without its own `exported_files` line (which holds it)."""
    lines = text.splitlines(keepends=True)
    return hashlib.sha256("".join(x for x in lines if not x.startswith(f"{EXPORTED_FILES}: ")).encode()).hexdigest()


def written_files(folder: Path, card: str) -> dict[str, str | None]:
    """Each entry an export wrote in folder -> its sha256 (None for a folder), README.md's that
    of the card: the card's `exported_files`, by which the next export tells an edited file."""
    files = {p.name: None if p.is_dir() else file_sha256(p) for p in folder.iterdir()}
    return dict(sorted({**files, "README.md": card_sha256(card)}.items()))


def exported_manifest(card: str):
    """The card's `exported_files` (a dict name -> sha256; a list of names from before the
    hashes), or None: no such entry, or one that cannot be read. Our one-line JSON, or the YAML
    that huggingface_hub's card tools rewrite the front matter to."""
    for line in card.splitlines():
        if line.startswith(f"{EXPORTED_FILES}: "):
            try:
                found = json.loads(line.partition(": ")[2])
            except ValueError:
                found = None
            return found if isinstance(found, (list, dict)) else None
    parts = card.split("---", 2)
    if len(parts) == 3:
        try:
            import yaml  # (huggingface_hub's, with transformers)
            front = yaml.safe_load(parts[1])
        except Exception:  # noqa: BLE001 (no yaml, or a front matter that is no YAML)
            return None
        found = front.get(EXPORTED_FILES) if isinstance(front, dict) else None
        return found if isinstance(found, (list, dict)) else None
    return None


def users_files(dest: Path) -> tuple[list[Path], bool]:
    """What a user added to an earlier export in dest (notes, a license, a picture), or changed
    there since (an edited card): the entries its card's `exported_files` does not list or lists
    with another sha256. A new export carries them over where it writes no file of that name;
    the files the earlier export wrote are replaced. A folder export.py did not write, or a card
    whose list is gone or unreadable: all of it (so nothing is replaced without --force). With
    them, whether dest is such a card of ours that lost its list (an older export, or edited)."""
    if not dest.is_dir() or dest.is_symlink():
        return [], False
    if not is_our_export(dest):
        return sorted(dest.iterdir()), False
    card = (dest / "README.md").read_text(encoding="utf-8", errors="replace")
    ours = exported_manifest(card)
    if ours is None:
        return sorted(dest.iterdir()), True
    if isinstance(ours, list):  # an export from before the card held each file's sha256
        return sorted(p for p in dest.iterdir() if p.name not in ours), False

    def changed(p: Path) -> bool:
        if p.name not in ours:
            return True
        if ours[p.name] is None or p.is_dir():  # (a folder: not hashed)
            return False
        now = card_sha256(card) if p.name == "README.md" else file_sha256(p)
        return now != ours[p.name]
    return sorted(p for p in dest.iterdir() if changed(p)), False


def real_destination(dest: Path) -> Path:
    """dest with "." and ".." worked out (--dest=., --dest=DIR/sub/..): the export is written
    beside dest, under a name made from dest's, then renamed into place, and such a path has no
    name of its own. Other paths stay as typed, for the card and the messages (and a dest that
    is a symbolic link stays the link, which the export replaces)."""
    if dest.name not in ("", "..") and ".." not in dest.parts:
        return dest
    if dest.name in ("", ".."):
        dest = Path(os.path.realpath(dest))
    else:  # DIR/sub/../name: the folder above worked out, the name kept
        dest = Path(os.path.realpath(dest.parent)) / dest.name
    if not dest.name:
        raise UserError(f"--dest={dest} is the root folder; name a folder to write, e.g. --dest=exports/model")
    return dest


def working_folder() -> Path | None:
    try:
        return Path.cwd().resolve()
    except OSError:  # the folder the process started in is gone
        return None


def is_working_folder(dest: Path) -> bool:
    """Whether dest is the folder export.py runs in (--dest=.): a shell there would be left in a
    deleted folder if dest were replaced as a whole, so its files are replaced instead."""
    return dest.resolve() == working_folder()


FORMAT_NAMES = {"hf": "Hugging Face (--format=hf)", "onnx": "ONNX (--format=onnx)", "gguf": "GGUF (--format=gguf)"}
FORMAT_FILES = {"hf": "model.safetensors", "onnx": "model.onnx", "gguf": "model.gguf"}  # what tells them apart


def export_format(dest: Path) -> str | None:
    """The --format of the export of ours in dest, by the weights file its card lists (None: unknown)."""
    card = (dest / "README.md").read_text(encoding="utf-8", errors="replace")
    listed_files = exported_manifest(card) or []
    return next((fmt for fmt, name in FORMAT_FILES.items() if name in listed_files), None)


def check_destination(dest: Path, force: bool):
    if blocker := durable.file_in_the_way(dest):
        raise UserError(f"--dest={dest} lies under {blocker}, which is a file, not a folder; choose another --dest")
    if working_folder() is not None and dest.resolve() in working_folder().parents:
        raise UserError(f"--dest={dest} holds the folder you are in ({working_folder()}), which replacing it "
                        f"would delete; choose another --dest")
    if not dest.exists():
        return
    if dest.is_dir() and (is_our_export(dest) or not any(dest.iterdir())):
        return
    if is_working_folder(dest):  # even with --force: the files of the folder one works in stay
        shown = listed(sorted(p.name for p in dest.iterdir()), 5)
        raise UserError(f"--dest={dest} is the folder you are in, and it holds files export.py did not write "
                        f"({shown}); refusing to write among them, --force or not. Choose a new or empty folder, "
                        f"e.g. --dest=export")
    if force:
        return
    if not dest.is_dir():
        raise UserError(f"--dest={dest} is a file; refusing to replace it. Choose another --dest, or pass "
                        f"--force to replace it")
    shown = listed(sorted(p.name for p in dest.iterdir()), 5)
    raise UserError(f"--dest={dest} holds files export.py did not write ({shown}; a card of ours without its "
                    f"'{MARKER}' line counts as yours); choose another --dest, or pass --force to write the "
                    f"export among them (files of the same name replaced, the others kept)")


def fsync(path: Path):
    """A file's contents, or a folder's entries where the OS allows it (durable.py), to disk."""
    durable.fsync_folder(path) if path.is_dir() else durable.fsync_file(path)


def write_atomically(dest: Path, write):
    """write(tmp) fills a temporary folder beside dest, which then takes dest's place. In the
    working folder (--dest=.) the files take the place of its files instead: the folder stays,
    and a shell in it sees the export."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")  # the previous dest, until the new one is in place
    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]  # deepest first
    in_place = is_working_folder(dest)
    moved_in: list[Path] = []  # in place: the new export's files already in dest

    def clean_up():
        shutil.rmtree(tmp, ignore_errors=True)
        if in_place and old.is_dir():  # the new files out, the previous ones back (an export's files: no folders)
            for path in moved_in:
                path.unlink(missing_ok=True)
            for path in old.iterdir():
                os.replace(path, dest / path.name)
            old.rmdir()
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
    umask = os.umask(0)  # (read by setting it: the files get the modes the user's umask gives)
    os.umask(umask)
    try:
        write(tmp)
        for path in [*tmp.rglob("*"), tmp]:  # every file on disk before the folder takes dest's place
            if path.is_file():
                path.chmod(0o666 & ~umask)  # some writers create files readable by their owner only
            fsync(path)
        if in_place:
            old.mkdir()
            for path in dest.iterdir():
                os.replace(path, old / path.name)
            for path in tmp.iterdir():
                os.replace(path, dest / path.name)
                moved_in.append(dest / path.name)
            tmp.rmdir()
        else:
            if dest.exists() or dest.is_symlink():
                os.replace(dest, old)
            os.replace(tmp, dest)
        fsync(dest if in_place else dest.parent)  # make the renames themselves durable
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
    dest = real_destination(Path(cfg.dest or f"exports/{Path(cfg.out_dir).resolve().name}-{cfg.format}"))
    if dest.resolve() in (Path(cfg.out_dir).resolve(), *Path(cfg.out_dir).resolve().parents):
        raise UserError(f"--dest={dest} holds the checkpoint folder --out_dir={cfg.out_dir}, which an export "
                        f"would replace; choose a --dest outside it")
    check_destination(dest, cfg.force)
    model, tokenizer, ckpt = load_model(cfg.out_dir, "cpu")
    model.float()
    holder = runlock.read_note(Path(cfg.out_dir) / "train.lock")  # train.py's: a run still going there
    if holder and not runlock.holder_is_gone(holder):  # (another host's run: cannot be checked from here)
        here = holder.get("host") == socket.gethostname()
        print(f"note: a run {'still trains' if here else 'may still train'} in {cfg.out_dir} "
              f"({runlock.describe(holder)}): this export is of its checkpoint at iteration {ckpt.get('iter_num')}; "
              f"export again when it ends for the final model", file=sys.stderr)
    if cfg.format == "gguf":  # before anything is written
        check_gguf(model, tokenizer)
    if cfg.format == "hf" and (unknown := hf_format.remote_code_options(model.config)):
        raise UserError(f"--format=hf cannot export this model yet: the modeling code it ships "
                        f"(hf_remote/) does not know {', '.join(unknown)}, so transformers would compute another "
                        f"model; --format=onnx exports it (adding an option to hf_remote/: docs/options.md)")
    card = model_card(model, tokenizer, ckpt, cfg.format, str(dest), cfg.repo_id)
    users, unlisted = users_files(dest)
    before = export_format(dest) if dest.is_dir() and is_our_export(dest) else None  # another format's, replaced
    written: list[str] = []

    def write(folder: Path):
        WRITERS[cfg.format](model, tokenizer, folder, ckpt.get("instruct"))
        if (folder / "tokenizer_config.json").is_file():  # the run's figures, for app.py's card of the folder
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            finite = {k: v if isinstance(v, float) and math.isfinite(v) else None
                      for k, v in ((k, ckpt.get(k)) for k in ("best_val_loss", "val_loss"))}
            config[hf_format.OUR_RUN_KEY] = {"dataset": (ckpt.get("config") or {}).get("dataset"),
                                             "iter_num": ckpt.get("iter_num"), **finite,
                                             "holds_best": ckpt.get("holds_best", True), "best_iter": ckpt.get("best_iter")}
            write_json(folder / "tokenizer_config.json", config)
        written[:] = sorted({p.name for p in folder.iterdir()} | {"README.md"})
        if (clash := [p.name for p in users if p.name in written]) and not cfg.force and unlisted:
            raise UserError(f"--dest={dest} is an export whose card no longer lists the files export.py wrote (an "
                            f"older export, or its exported_files line was edited), so they cannot be told from "
                            f"yours: --force replaces those this export writes ({', '.join(clash)}) and keeps the rest")
        if clash and not cfg.force:
            hint = ("; for your card: copy your edits, pass --force, and put them into the new README.md"
                    if "README.md" in clash else "")
            raise UserError(f"--dest={dest} holds {', '.join(clash)}, which you added or changed there since "
                            f"export.py wrote it, and this export would replace; move it away, choose another "
                            f"--dest, or pass --force to replace it{hint}")
        files = json.dumps(written_files(folder, card))
        (folder / "README.md").write_text(card.replace(MARKER, f"{MARKER}\n{EXPORTED_FILES}: {files}"), encoding="utf-8")
        for path in users:  # the user's own files, where the export writes none of that name
            if path.name not in written:
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, folder / path.name)

    write_atomically(dest, write)
    print(f"wrote {dest} ({', '.join(written)})", file=sys.stderr)
    if kept := [p.name for p in users if p.name not in written]:
        print(f"kept what you had added or changed there: {', '.join(kept)}", file=sys.stderr)
    if replaced := [p.name for p in users if p.name in written]:
        print(f"replaced what you had added or changed there (--force): {', '.join(replaced)}", file=sys.stderr)
    if before not in (None, cfg.format):  # the two cannot share a folder: each has its own config.json
        print(f"note: this {FORMAT_NAMES[cfg.format]} export replaced the {FORMAT_NAMES[before]} export that was "
              f"in {dest}; to keep both, export each format to its own --dest (e.g. {dest}-{before})",
              file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
