"""Our GPT <-> Hugging Face GPT-2: weights, config and tokenizer, in both directions.

export.py writes folders with it; train.py and sample.py read them (--init_from=PATH or a
GPT-2 name). The two models are the same network with the same module names; they differ in:
- layout: GPT-2's attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj are Conv1D layers whose
  weight is (in, out), the transpose of our nn.Linear's (out, in); the head is tied to wte in
  both;
- biases: GPT-2 always has them, so a model trained with bias=False exports zeros;
- the MLP nonlinearity: GPT-2 used the tanh approximation of GELU ("gelu_new"), nanoGPT the
  exact one ("gelu"); GPTConfig.activation says which, and config.json carries it.
A model with options GPT-2 lacks (GPTConfig.non_gpt2_options: rotary, rmsnorm, ...) travels
instead as a folder of model_type "nanogpt": config.json holds our GPTConfig fields,
model.safetensors our own state dict, and hf_remote/'s configuration and modeling files sit
beside them, so transformers builds it with trust_remote_code=True (export.py writes these
folders; load_model reads them back without transformers).
The tokenizer travels as tokenizer.json (Hugging Face tokenizers), built from the tokenizer
we hold, never downloaded: tiktoken's ranks, pattern and special tokens for BPE, one token
per character for char-level.

transformers, tokenizers and safetensors are extras: a missing one is one line saying which
pip command installs it.
"""
import dataclasses
import importlib
import json
import os
import re
from pathlib import Path

import torch

import hardware
import template
from errors import UserError, quoted
from model import GPT, GPTConfig
from tokenizer import CHAR, Tokenizer, bytes_to_unicode

EXTRAS = "pip install -r requirements-extras.txt"
EOT = "<|endoftext|>"
# nanoGPT's names for OpenAI's four GPT-2 sizes -> their Hugging Face Hub repositories
GPT2_NAMES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
# GPTConfig.activation <-> GPT2Config.activation_function (transformers' ACT2FN keys)
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
FROM_HF_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# weights stored as Conv1D (in, out) in GPT-2 and as nn.Linear (out, in) here
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, and GPT-2's


def require(module: str, purpose: str):
    """Import an extra, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs the Python package {module!r}, which is not installed; "
                        f"install the extras with `{EXTRAS}`") from None


# ---------------------------------------------------------------------------- weights and config

def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict in GPT2LMHeadModel's names and layout (float32, contiguous)."""
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float()
        out[name] = tensor.t().contiguous() if name.endswith(CONV1D) else tensor.clone()
    if not model.config.bias:  # GPT-2 always has biases: a bias-free model exports zeros
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head":
                out[f"{name}.bias"] = torch.zeros(module.weight.shape[0])
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict -> ours (without the causal-mask buffers that older
    transformers versions saved as h.N.attn.bias and h.N.attn.masked_bias)."""
    out = {}
    for name, tensor in hf_state.items():
        if name.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"]):
            continue
        out[name] = tensor.t() if name.endswith(CONV1D) else tensor
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def hf_config_dict(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """config.json of a GPT2LMHeadModel with our model's shape (a plain dict, so the ONNX
    export writes it without transformers)."""
    if config.activation not in TO_HF_ACTIVATION:
        raise UserError(f"activation {config.activation!r} has no GPT-2 equivalent in transformers; "
                        f"only {', '.join(TO_HF_ACTIVATION)} export")
    eot = tokenizer.eot_id
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": TO_HF_ACTIVATION[config.activation],
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": None,
    }


# ---------------------------------------------------------------------------- models GPT-2 cannot express

NANOGPT = "nanogpt"  # config.json's model_type of the folders with our modeling code
REMOTE_CODE = Path(__file__).resolve().parent / "hf_remote"  # the files copied into those folders
REMOTE_FILES = ("configuration_nanogpt.py", "modeling_nanogpt.py")
# GPTConfig's fields in such a config.json, with the type each must have (dropout and
# zero_init_proj are training settings, not part of the exported model). configuration_nanogpt.py
# takes the same (tests/test_export_options.py checks it), modeling_nanogpt.py computes them.
NANOGPT_FIELDS = {f.name: f.type for f in dataclasses.fields(GPTConfig) if f.name not in ("dropout", "zero_init_proj")}


def remote_code_options(config: GPTConfig) -> list[str]:
    """The options of config set away from their defaults that configuration_nanogpt.py does not
    take (an option added to model.py, not yet to the shipped code): an export of it would load
    and compute another model. Read from the file itself, without importing transformers."""
    import ast
    tree = ast.parse((REMOTE_CODE / "configuration_nanogpt.py").read_text(encoding="utf-8"))
    inits = [f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "NanoGPTConfig"
             for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"]
    if not inits:
        raise UserError(f"{REMOTE_CODE / 'configuration_nanogpt.py'} has no NanoGPTConfig.__init__; restore it "
                        f"from the repository")
    taken = {a.arg for a in inits[0].args.args + inits[0].args.kwonlyargs}
    return [f"{k}={getattr(config, k)!r}" for k in NANOGPT_FIELDS
            if k not in taken and getattr(config, k) != getattr(GPTConfig(), k)]


def nanogpt_config_dict(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """config.json of a model GPT-2 cannot express: our fields, and where transformers finds the
    code (auto_map, the convention for models outside the library)."""
    eot = tokenizer.eot_id
    return {"architectures": ["NanoGPTForCausalLM"], "model_type": NANOGPT,
            "auto_map": {"AutoConfig": "configuration_nanogpt.NanoGPTConfig",
                         "AutoModelForCausalLM": "modeling_nanogpt.NanoGPTForCausalLM"},
            **{k: getattr(config, k) for k in NANOGPT_FIELDS},
            "tie_word_embeddings": config.tie_head, "use_cache": True, "dtype": "float32",
            "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": None}


def nanogpt_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict as model.safetensors holds it: float32, contiguous, without the head when
    it is the token embedding (safetensors stores a tensor once; transformers ties it back)."""
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_head:
        del state["lm_head.weight"]
    return state


def _nanogpt_config(folder: Path, c: dict) -> GPTConfig:
    """Our GPTConfig from a nanogpt folder's config.json, checked field by field."""
    bad = [f"{k} {c.get(k)!r}" for k, kind in NANOGPT_FIELDS.items()
           if not isinstance(c.get(k), kind) or (kind is int and isinstance(c.get(k), bool))]
    if not bad:
        config = GPTConfig(**{k: c[k] for k in NANOGPT_FIELDS}, dropout=0.0)
        bad = config.problems()
    if bad:
        raise UserError(f"{folder / 'config.json'} has invalid or missing settings ({', '.join(bad)}); "
                        f"the folder is damaged")
    return config


def gpt_config(folder: Path) -> GPTConfig:
    """Our GPTConfig from a Hugging Face folder's config.json: a GPT-2, or a model of ours with
    options GPT-2 lacks (model_type nanogpt); refuses anything this model does not compute exactly."""
    path = folder / "config.json"
    if not path.is_file():
        if (folder / "ckpt.pt").is_file():  # a run's folder: sample.py and eval.py read it with --out_dir
            raise UserError(f"{folder} holds a checkpoint of train.py (ckpt.pt), not a Hugging Face model: "
                            f"pass it as --out_dir={quoted(folder)}")
        raise UserError(f"{folder} is not a Hugging Face model folder (no config.json); give a folder "
                        f"written by export.py --format=hf or by transformers' save_pretrained (train.py's "
                        f"--init_from also takes a run's folder holding a ckpt.pt)")
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        c = None
    if not isinstance(c, dict):
        raise UserError(f"{path} is not valid JSON (an object of settings); the folder is damaged")
    if c.get("model_type") == NANOGPT:
        return _nanogpt_config(folder, c)
    if c.get("model_type") != "gpt2":
        raise UserError(f"{folder} holds a {c.get('model_type')!r} model, not a GPT-2 (model_type "
                        f"'gpt2') or an export of ours ({NANOGPT!r}); only these load here")
    act = c.get("activation_function", "gelu_new")
    unsupported = []
    if act not in FROM_HF_ACTIVATION:
        unsupported.append(f"activation_function {act!r}")
    if c.get("n_inner") is not None and c.get("n_inner") != 4 * c.get("n_embd", 768):
        unsupported.append(f"n_inner {c['n_inner']} (this model's MLP is 4 * n_embd wide)")
    if c.get("layer_norm_epsilon", LAYER_NORM_EPS) != LAYER_NORM_EPS:
        unsupported.append(f"layer_norm_epsilon {c['layer_norm_epsilon']}")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if c.get(flag):
            unsupported.append(flag)
    if not c.get("scale_attn_weights", True):
        unsupported.append("scale_attn_weights false")
    if not c.get("tie_word_embeddings", True):
        unsupported.append("an output head not tied to the embeddings")
    if unsupported:
        raise UserError(f"{folder} is a GPT-2 variant this model does not compute: "
                        f"{', '.join(unsupported)}")
    # GPT2Config's defaults for what the file leaves out
    shape = {"n_positions": 1024, "vocab_size": 50257, "n_layer": 12, "n_head": 12, "n_embd": 768}
    shape.update({k: c[k] for k in shape if k in c})
    bad = [f"{k} {v!r}" for k, v in shape.items() if not (isinstance(v, int) and v >= 1)]
    if not bad and shape["n_embd"] % shape["n_head"]:
        bad.append(f"n_embd {shape['n_embd']} not divisible by n_head {shape['n_head']}")
    if bad:
        raise UserError(f"{path} has an invalid shape ({', '.join(bad)}); the folder is damaged")
    return GPTConfig(block_size=shape["n_positions"], vocab_size=shape["vocab_size"], n_layer=shape["n_layer"],
                     n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=0.0, bias=True,
                     activation=FROM_HF_ACTIVATION[act])


# ---------------------------------------------------------------------------- tokenizer


def onig_pattern(pattern: str) -> str:
    r"""tiktoken's split pattern (Rust regex syntax) for tokenizers' Oniguruma engine, which
    reads two things differently: `{1,3}+` is "repeat {1,3}" there, not possessive (a bounded
    run has nothing to give back here, so plain `{1,3}` splits the same), and `$` is the end
    of a line there, the end of the text in tiktoken (`\z` in both)."""
    pattern = re.sub(r"(?<!\\)\}\+", "}", pattern)
    return re.sub(r"(?<!\\)\$", r"\\z", pattern)


def hf_tokenizer(tokenizer: Tokenizer):
    """A tokenizers.Tokenizer that gives the same ids and text as ours.

    char: a BPE model with one token per character and no merges, no normalizer and no
    pre-tokenizer, so every character (newline, space, accent) maps to its own id, and a
    Fuse decoder that joins tokens without spaces. An end-of-text id, where there is one,
    becomes the special token <|endoftext|>.
    BPE: tiktoken's ranks become the vocabulary (each token's bytes in GPT-2's byte-level
    alphabet) and the merges (every split of a token into two tokens, in the order of the
    merged token's rank: tiktoken merges the pair whose result ranks lowest); tiktoken's
    split pattern becomes the pre-tokenizer; special tokens keep their ids (cl100k and o200k
    leave gaps below them, so they sit in the vocabulary too). Built generically from the
    Encoding, so any tiktoken vocabulary exports the same way.
    """
    tk = require("tokenizers", "the tokenizer.json export")
    if tokenizer.encoding is None:
        vocab = {c: i for i, c in enumerate(tokenizer.chars)}
        specials = {EOT: tokenizer.eot_id} if tokenizer.eot_id is not None else {}
        tok = tk.Tokenizer(tk.models.BPE({**vocab, **specials}, [], fuse_unk=False))
        tok.decoder = tk.decoders.Fuse()
    else:
        enc = tokenizer.encoding
        # tiktoken has no public accessor for its ranks and pattern; these two are stable
        ranks: dict[bytes, int] = enc._mergeable_ranks
        table = bytes_to_unicode()  # keys are byte values = the latin-1 code points translate looks up
        as_str = {token: token.decode("latin-1").translate(table) for token in ranks}
        vocab = {as_str[token]: rank for token, rank in ranks.items()}
        merges = []  # (rank of the merged token, rank of left, rank of right, left, right)
        for token, rank in ranks.items():
            for i in range(1, len(token)):
                left, right = token[:i], token[i:]
                if left in ranks and right in ranks:
                    merges.append((rank, ranks[left], ranks[right], as_str[left], as_str[right]))
        merges.sort()
        specials = {name: enc.encode_single_token(name) for name in sorted(enc.special_tokens_set)}
        model = tk.models.BPE({**vocab, **specials}, [m[3:] for m in merges],
                              fuse_unk=False, ignore_merges=True)  # a whole piece in the vocabulary is one token, as in tiktoken
        tok = tk.Tokenizer(model)
        tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Split(tk.Regex(onig_pattern(enc._pat_str)), behavior="isolated", invert=False),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = tk.decoders.ByteLevel()
    if specials:
        tok.add_special_tokens([tk.AddedToken(name, special=True, normalized=False) for name in specials])
    for name, i in specials.items():
        assert tok.token_to_id(name) == i, (name, i, tok.token_to_id(name))
    return tok


OUR_TOKENIZER_KEY = "nanogpt_tokenizer"  # in tokenizer_config.json: tokenizer.Tokenizer.describe()
OUR_INSTRUCT_KEY = "nanogpt_instruct"  # in tokenizer_config.json: the checkpoint's instruct (template, chat)
OUR_RUN_KEY = "nanogpt_run"  # in tokenizer_config.json: the run's dataset, iterations and best val loss


def tokenizer_config(tokenizer: Tokenizer, block_size: int, instruct: dict | None = None) -> dict:
    """tokenizer_config.json: what AutoTokenizer needs besides tokenizer.json. A model trained on
    instruction records (instruct: the checkpoint's template) also gets its chat_template, for
    apply_chat_template, and the template itself, for our --init_from."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "model_input_names": ["input_ids", "attention_mask"],  # as GPT-2's: no token_type_ids for generate()
              "clean_up_tokenization_spaces": False, "add_prefix_space": False}
    if tokenizer.eot_id is not None:
        config.update(bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT)  # pad: for padding=True batches
    # our own description, ignored by transformers: --init_from=PATH gets back exactly the
    # tokenizer the model was trained with (a trained bpe vocabulary, documents mode)
    config[OUR_TOKENIZER_KEY] = tokenizer.describe()
    if instruct:
        config["chat_template"] = template.chat_template(instruct["template"])
        config[OUR_INSTRUCT_KEY] = instruct
    return config


def instruct_of(folder: Path) -> dict | None:
    """The instruction template an export of ours left in tokenizer_config.json (None if none):
    sample.py and app.py then wrap prompts as the model was trained."""
    instruct = _ours_in_tokenizer_config(folder, OUR_INSTRUCT_KEY)
    ok = (instruct is not None and isinstance(instruct.get("template"), dict)
          and all(isinstance(instruct["template"].get(k), str) for k in template.TEMPLATE))
    return {"template": instruct["template"], "chat": bool(instruct.get("chat"))} if ok else None


def run_of(folder: Path) -> dict:
    """What an export of ours recorded of its run (dataset, iter_num, best_val_loss, and where the
    model is not the run's best its own val_loss, holds_best and best_iter: the model card's
    figures), each None where the folder says nothing of it."""
    run = _ours_in_tokenizer_config(folder, OUR_RUN_KEY) or {}
    kinds = {"dataset": str, "iter_num": int, "best_val_loss": (int, float), "val_loss": (int, float),
             "holds_best": bool, "best_iter": int}
    return {k: run.get(k) if isinstance(run.get(k), kind) and (kind is bool or not isinstance(run.get(k), bool))
            else None for k, kind in kinds.items()}


def _vocab_of(folder: Path) -> tuple[dict[str, int], dict[str, int], bool]:
    """(model vocabulary token -> id, special tokens -> id, whether it has merges) of a folder's
    tokenizer.json, or of GPT-2's older vocab.json + merges.txt."""
    path = folder / "tokenizer.json"
    try:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            model = data["model"]
            if model.get("type") != "BPE":
                raise UserError(f"{path} holds a {model.get('type')} tokenizer; only byte-level BPE "
                                f"(GPT-2 style) and our char-level tokenizers load here")
            specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
            return dict(model["vocab"]), specials, bool(model.get("merges"))
        if (folder / "vocab.json").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            return dict(vocab), ({EOT: vocab[EOT]} if EOT in vocab else {}), True
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise UserError(f"the tokenizer files in {folder} are damaged ({type(e).__name__}: {e})") from None
    raise UserError(f"{folder} has no tokenizer (tokenizer.json or vocab.json); copy the tokenizer files "
                    f"of the model into it")


def _ours_in_tokenizer_config(folder: Path, key: str) -> dict | None:
    """What export.py left under key in the folder's tokenizer_config.json (a dict), if any."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = config.get(key) if isinstance(config, dict) else None
    return entry if isinstance(entry, dict) else None


def load_tokenizer(folder: Path) -> Tokenizer:
    """Our Tokenizer for a model folder: the one an export of ours describes, else char-level,
    or the tiktoken encoding whose ranks the folder's byte-level BPE vocabulary equals (gpt2,
    cl100k_base, ...)."""
    import tiktoken
    vocab, specials, has_merges = _vocab_of(folder)
    ours = _ours_in_tokenizer_config(folder, OUR_TOKENIZER_KEY)
    if ours is not None:
        tokenizer = Tokenizer.from_description(ours)
        if tokenizer.vocab_size != len(vocab | specials):
            raise UserError(f"the tokenizer files in {folder} disagree ({len(vocab | specials)} tokens in "
                            f"tokenizer.json, {tokenizer.vocab_size} in tokenizer_config.json); the folder was edited")
        return tokenizer
    ordinary = {t: i for t, i in vocab.items() if t not in specials}
    if not ordinary:
        raise UserError(f"the tokenizer in {folder} has an empty vocabulary; the folder is damaged")
    if not has_merges and all(len(t) == 1 for t in ordinary):  # one token per character: ours, char-level
        chars = [t for t, _ in sorted(ordinary.items(), key=lambda item: item[1])]
        if sorted(ordinary.values()) != list(range(len(chars))):
            raise UserError(f"the character vocabulary in {folder} does not number its characters 0..n-1")
        return Tokenizer.from_description({"name": CHAR, "chars": chars, "eot_id": specials.get(EOT)})
    unicode_byte = {c: b for b, c in bytes_to_unicode().items()}
    try:
        ranks = {bytes(unicode_byte[c] for c in t): i for t, i in ordinary.items()}
    except KeyError:
        raise UserError(f"the tokenizer in {folder} is not a byte-level BPE (GPT-2 style) vocabulary") from None
    for name in tiktoken.list_encoding_names():
        try:
            enc = tiktoken.get_encoding(name)
        except Exception:  # noqa: BLE001 (offline without that encoding's files: not a candidate)
            continue
        if len(enc._mergeable_ranks) == len(ranks) and enc._mergeable_ranks == ranks:
            return Tokenizer.tiktoken(name)
    raise UserError(f"the BPE vocabulary in {folder} ({len(ranks)} tokens) matches no tiktoken encoding "
                    f"available here ({', '.join(tiktoken.list_encoding_names())}); set TIKTOKEN_CACHE_DIR "
                    f"if its files are cached elsewhere")


# ---------------------------------------------------------------------------- loading a folder or a name

def resolve(init_from: str) -> Path:
    """The local folder of --init_from: a path, or a GPT-2 name found in transformers' cache
    (never downloaded: this machine may be offline)."""
    if init_from in GPT2_NAMES:
        hub = require("huggingface_hub", f"--init_from={init_from}")
        for repo in (GPT2_NAMES[init_from], init_from):  # today's name, and the one older caches used
            try:
                # HF_HUB_CACHE read now, not at import, so a cache set after start is seen
                return Path(hub.snapshot_download(repo, local_files_only=True,
                                                  cache_dir=os.environ.get("HF_HUB_CACHE")))
            except Exception:  # noqa: BLE001 (LocalEntryNotFoundError and kin: not cached)
                continue
        cache = os.environ.get("HF_HUB_CACHE") or str(Path(hub.constants.HF_HUB_CACHE))
        raise UserError(f"{init_from} is not in transformers' local cache ({cache}); on a machine with internet "
                        f"run `hf download {GPT2_NAMES[init_from]}` (it lands in ~/.cache/huggingface/hub; "
                        f"copy that folder here or set HF_HUB_CACHE), or pass --init_from=PATH of a downloaded folder")
    folder = Path(init_from)
    if not folder.is_dir():
        raise UserError(f"--init_from={init_from}: no such folder, and not one of {', '.join(GPT2_NAMES)}")
    refuse_onnx_export(folder, "--init_from")
    return folder


EXPORT_MARKER = "exported_by: nanogpt-toolkit export.py"  # in an export's card: how a folder is known as ours


def refuse_onnx_export(folder: Path, flag: str):
    """An ONNX or GGUF folder (no weights torch loads, no ckpt.pt) where a model to load belongs:
    one line saying what it is and what to pass instead (an export of ours, or another's model)."""
    if (folder / "ckpt.pt").exists() or any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        return
    try:
        ours = EXPORT_MARKER in (folder / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        ours = False
    for fmt, kind, runner in (("onnx", "an ONNX", "onnxruntime"), ("gguf", "a GGUF", "llama.cpp")):
        if any(folder.glob(f"*.{fmt}")):
            if not ours:
                raise UserError(f"{flag}={folder} holds {kind} model ({runner}'s format), which is not loaded here; "
                                f"give a run's --out_dir or a Hugging Face GPT-2 folder")
            raise UserError(f"{flag}={folder} is {kind} export (export.py --format={fmt}): it runs in "
                            f"{runner} and is not loaded back here; use its run's --out_dir, or an --format=hf export")


def check_memory(folder: Path, config: GPTConfig):
    """Refuse, before loading, a model that does not fit: loading holds transformers' copy
    and ours at once, both float32."""
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
    if not weights:
        refuse_onnx_export(folder, "--init_from")
        raise UserError(f"{folder} has no weights (model.safetensors or pytorch_model.bin)")
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    on_disk = sum(p.stat().st_size for p in weights)
    # GPT-2's count, or the float32 file's when larger (the tables of bigram, value_embeds, an untied head)
    params = max(V * C + config.block_size * C + L * (12 * C * C + 13 * C) + 2 * C, on_disk // 4)
    needed = 2 * 4 * params
    have = hardware.available_memory()
    if needed > have:
        raise UserError(f"{folder} holds a {params / 1e6:,.0f}M-parameter model ({on_disk / 2**30:.1f} GiB on disk) "
                        f"that needs about {needed / 2**30:.1f} GiB of memory to load, but only "
                        f"{have / 2**30:.1f} GiB is available; use a smaller model or a bigger machine")


def _load_nanogpt(folder: Path, config: GPTConfig) -> GPT:
    """Our GPT with the weights of a nanogpt folder: model.safetensors is our own state dict."""
    safetensors = require("safetensors", f"loading the model in {folder}")
    from safetensors.torch import load_file
    try:
        state = load_file(folder / "model.safetensors")
    except (OSError, safetensors.SafetensorError) as e:
        raise UserError(f"could not read {folder / 'model.safetensors'}: {e}; the folder is damaged") from None
    if config.tie_head:
        state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    try:
        model = GPT.from_state_dict(config, state)
    except (RuntimeError, TypeError) as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{folder}: the weights do not match its config.json ({first}); the folder is "
                        f"damaged or was edited") from None
    return model


def load_model(folder: Path, config: GPTConfig) -> GPT:
    """Our GPT (train mode, cpu) with the weights of the model in folder; config comes from
    gpt_config(folder), with the dropout the caller wants."""
    check_memory(folder, config)
    if json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == NANOGPT:
        return _load_nanogpt(folder, config)
    transformers = require("transformers", f"loading the GPT-2 in {folder}")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load the GPT-2 weights in {folder}: {first}") from None
    return GPT.from_state_dict(config, from_hf_state_dict(hf.state_dict()))


def load(init_from: str) -> tuple[GPT, Tokenizer]:
    """(our GPT in eval mode on the cpu, its Tokenizer) from a Hugging Face folder (a GPT-2, or
    an export of ours with options GPT-2 lacks) or a GPT-2 name: the entry point for sample.py
    and app.py."""
    folder = resolve(init_from)
    config = gpt_config(folder)
    check_memory(folder, config)
    tokenizer = load_tokenizer(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{config.vocab_size}; the folder is inconsistent")
    return load_model(folder, config).eval(), tokenizer
