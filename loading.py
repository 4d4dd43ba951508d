"""A trained model back in memory, for the scripts that run one (sample.py, app.py, export.py,
bench.py): from train.py's checkpoint, or from a Hugging Face GPT-2 (a folder, as export.py
writes one, or a GPT-2 name found in transformers' local cache); and the precision to run it in.
"""
import dataclasses
from pathlib import Path

import checkpoint
import hardware
import hf_format
import lora
from errors import UserError, quoted
from model import GPT, GPTConfig
from tokenizer import Tokenizer


def choose_precision(device: str, dtype: str) -> hardware.Precision:
    """hardware.resolve, except that dtype auto means float32 on a CPU: decoding one token at a
    time is a chain of small matrix-vector products, where autocast's casts cost more than they
    save. GPUs keep hardware.resolve's choice."""
    precision = hardware.resolve(device, dtype)
    if dtype == "auto" and precision.device_type == "cpu" and precision.dtype != "float32":
        device_reason = precision.reason.partition(", dtype")[0]
        precision = hardware.Precision(precision.device, "float32", (
            f"{device_reason}, dtype float32 (token-by-token decoding on cpu is faster without "
            f"bf16 autocast; --dtype=bfloat16 to override)"))
    return precision


def check_folder(path: str, flag: str = "--out_dir"):
    """A file where a model's folder belongs (--out_dir=out/ckpt.pt, a Hugging Face folder's
    weights file): one line naming the folder to pass instead."""
    if Path(path).is_file():
        raise UserError(f"{flag}={path} is a file: pass the folder that holds it (a run's ckpt.pt, or a "
                        f"Hugging Face model), {flag}={Path(path).parent}")


def check_one_model(init_from: str, explicit: set):
    """sample.py and eval.py: --out_dir (a run's checkpoint, or a Hugging Face folder there) and
    --init_from (a GPT-2 name or folder) each choose the model; both given is a mistake."""
    if init_from != "resume" and "out_dir" in explicit:
        raise UserError("--out_dir and --init_from each choose the model: pass one of them (--out_dir for a "
                        "run's checkpoint or a Hugging Face folder, --init_from for a GPT-2 name or folder)")


def check_not_an_export(folder: Path, flag: str = "--out_dir"):
    """A folder of export.py's where a run's checkpoint folder belongs: one line saying what it is."""
    if (folder / "ckpt.pt").exists() or not folder.is_dir():
        return
    hf_format.refuse_onnx_export(folder, flag)
    if is_hf_folder(folder):
        raise UserError(f"{flag}={folder} is a Hugging Face folder, not a run's checkpoint folder (ckpt.pt): pass "
                        f"the {flag} of the run it came from, or --init_from={quoted(folder)} where the script takes one")


def load_model(out_dir: str, device: str, flag: str = "--out_dir") -> tuple[GPT, Tokenizer, dict]:
    """The model (eval mode, on device) and tokenizer of <out_dir>/ckpt.pt, and the checkpoint;
    flag: the setting that named out_dir, for the messages."""
    check_folder(out_dir, flag)
    check_not_an_export(Path(out_dir), flag)
    path = Path(out_dir) / "ckpt.pt"
    ckpt = checkpoint.load(path)
    try:
        config = GPTConfig(**ckpt["model_args"])
    except TypeError as e:
        raise UserError(f"{path} has model_args this code does not know ({e}); "
                        f"it was written by another version of train.py") from None
    # a checkpoint of a compiled model saved without unwrapping has every key prefixed
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    state = lora.merge_state_dict(state, ckpt.get("lora"))  # a LoRA run's adapters folded into its weights
    try:
        model = GPT.from_state_dict(config, state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{path}: the weights do not match its model_args ({first}); "
                        f"the file is damaged or was edited") from None
    model.eval().to(device)
    tokenizer = Tokenizer.from_description(ckpt["tokenizer"])
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                        f"only {model.config.vocab_size}; the checkpoint is inconsistent")
    return model, tokenizer, ckpt


def is_hf_folder(folder: Path) -> bool:
    """A folder holding a Hugging Face model: config.json and its weights."""
    return (folder / "config.json").is_file() and any(
        (folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))


def is_model_folder(folder: Path) -> bool:
    """A folder load() reads: train.py's checkpoint folder, or a Hugging Face GPT-2 folder."""
    return (folder / "ckpt.pt").is_file() or is_hf_folder(folder)


def load(folder: str, device: str) -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode on device, tokenizer, info) from a folder: train.py's checkpoint
    (ckpt.pt) or, where there is none, a Hugging Face GPT-2 (export.py's, or downloaded); a
    folder with neither gets the checkpoint's error. info holds what a model card shows:
    model_args, config, iter_num, best_val_loss (None where the folder has no such thing)."""
    if (Path(folder) / "ckpt.pt").is_file() or not is_hf_folder(Path(folder)):
        model, tokenizer, ckpt = load_model(folder, device)  # (an ONNX export: said as such there)
        return model, tokenizer, {k: ckpt.get(k) for k in ("model_args", "config", "iter_num", "best_val_loss",
                                                           "instruct", "val_loss", "holds_best", "best_iter")}
    return load_hf(folder, device)


def load_hf(init_from: str, device: str) -> tuple[GPT, Tokenizer, dict]:
    """load()'s triple from a Hugging Face GPT-2 only: a folder or a GPT-2 name (--init_from)."""
    check_folder(init_from, "--init_from")
    model, tokenizer = hf_format.load(init_from)
    run = hf_format.run_of(hf_format.resolve(init_from))  # an export of ours: its run's figures
    info = {"model_args": dataclasses.asdict(model.config),
            "config": {"dataset": run["dataset"] or "(Hugging Face folder)"},
            "iter_num": run["iter_num"], **{k: run[k] for k in ("best_val_loss", "val_loss", "holds_best", "best_iter")},
            "instruct": hf_format.instruct_of(hf_format.resolve(init_from))}  # an instruction model's template
    return model.to(device), tokenizer, info
