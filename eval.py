"""Evaluate a model: loss, perplexity and bits per byte over a whole split or any text; per-line scores.

    python eval.py --out_dir=out-shakespeare-cpu                  # the whole val split of its dataset
    python eval.py --out_dir=out --split=train --json             # one JSON object
    python eval.py --out_dir=out --input=story.txt                # any UTF-8 file
    python eval.py --out_dir=out --input=combos.txt --per_line=scores.jsonl   # one score per line
    python eval.py --init_from=gpt2 --dataset=shakespeare         # a Hugging Face GPT-2 folder or name

What is scored:
- A split (--split, val by default) of the prepared dataset the checkpoint was trained on
  (--dataset and --data_dir choose another, prepared with the model's tokenizer; for
  instruction records, the answers and their ends only, as in training), or the text
  of --input, tokenized as prepare.py would (documents mode when the model was trained on
  documents: each document after its boundary token, the split closed by one; for a model
  trained on JSONL records each line of --input is one document).
- Every token but the first is predicted from the tokens before it, exactly once: the
  sequence is cut into windows of block_size tokens, all scored (--stride=block_size, the
  default, as train.py's val loss). A smaller --stride slides the window by that many
  tokens and scores only the last stride of each, so every token after the first window
  sees at least block_size - stride tokens of context (lower loss, block_size / stride
  times the work). In documents mode, windows start where documents start, positions restart
  and attention stops at each boundary, as in training (document_windows): every token is
  scored with its own document's context. train.py's val loss there is an estimate from random
  rows that each start at a document and run on into the next ones, so the two differ a little.

The figures (all from the summed negative log-likelihood of the scored tokens, in nats):
- loss: nats per token, and perplexity exp(loss): they depend on the tokenizer.
- bits per byte: nats / ln 2 / the UTF-8 bytes of the text the scored tokens stand for. It
  does not depend on the tokenizer, so a char-level and a BPE model of the same text compare
  (as nanochat reports). A document boundary stands for no bytes (it replaces the line end
  or blank line between documents); its prediction is scored like any token. Bits per
  character divide by the characters instead.

--per_line=OUT.jsonl (or OUT.tsv) scores every non-blank line of --input on its own (every
document, for a documents model): after a line end (after the boundary token for a documents
model), up to and including the line's end (the closing boundary). Each record holds the line
number, tokens, bytes, loss per token, bits per byte, the total log-probability in nats and
the text, so lines can be ranked by how likely the model finds them.

float32 unless --dtype asks for another; --int8 runs the blocks' matrices as int8 weight-only
linears (fast_decode.py) to measure what quantization costs.
"""
import errors
errors.starting(__name__)  # a missing requirement or a Ctrl-C while torch imports: one line, no traceback
import csv
import gc
gc.disable()  # no garbage collection while torch imports: start-up and exit ~0.3 s faster (docs/speed.md)
import json
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

import durable
import fast_decode
import hardware
from config import parse_config
from dataset import Dataset, document_positions
from documents import not_utf8, split_documents, text_of
from errors import UserError, run_main
from loading import check_one_model, load, load_hf
from tokenizer import Tokenizer
from tokenizer import mismatch as tokenizer_mismatch
gc.freeze()  # what the imports made is never traversed again, not even at exit
gc.enable()

# --batch_size=0: windows per forward pass such that it holds about MEMORY_BUDGET bytes (the
# logits, their log-softmax and the loss's float32 copies, and a layer's activations per token),
# and at most TOKENS_PER_PASS tokens (more are no faster on a CPU: only larger)
MEMORY_BUDGET = 2 ** 29
TOKENS_PER_PASS = 2 ** 13


def auto_batch_size(config) -> int:
    per_token = 4 * (3 * config.vocab_size + 16 * config.n_embd)
    return max(1, min(MEMORY_BUDGET // per_token, TOKENS_PER_PASS) // config.block_size)


@dataclass
class EvalConfig:
    """Settings of eval.py."""
    out_dir: str = "out"  # folder holding ckpt.pt, written by train.py
    init_from: str = "resume"  # resume (out_dir/ckpt.pt), a GPT-2 (gpt2, ...) or a Hugging Face GPT-2 folder
    dataset: str = ""  # prepared dataset to score; empty: the one the checkpoint was trained on
    data_dir: str = ""  # where prepared datasets live; empty: the checkpoint's (else data)
    split: str = "val"  # split of the dataset to score: val or train
    input: str = ""  # a UTF-8 text file to score instead of a split
    per_line: str = ""  # write each line's (document's) scores of --input to this .jsonl (or .tsv) file
    stride: int = 0  # tokens the window moves; 0 = block_size (non-overlapping windows, each token scored once)
    batch_size: int = 0  # windows per forward pass; 0 = automatic (a pass holds about 512 MB, at most 8,192 tokens)
    json: bool = False  # print one JSON object (loss, ppl, bits_per_byte, bits_per_char, tokens, bytes, ...)
    drop_unknown: bool = False  # char models: score --input without the characters the model never saw (per line: counted)
    int8: bool = False  # the blocks' matrices as int8 weight-only linears (cpu)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: str = "float32"  # float32, bfloat16 or float16 (autocast), or auto (the fastest safe one)

    def problems(self) -> list[str]:
        """Every setting that cannot work, so all are reported at once before any work."""
        p = []
        if self.split not in ("val", "train"):
            p.append(f"--split must be val or train, got {self.split!r}")
        if self.stride < 0:
            p.append(f"--stride must be >= 0 (0 = block_size), got {self.stride}")
        if self.batch_size < 0:
            p.append(f"--batch_size must be >= 0 (0 = automatic), got {self.batch_size}")
        if self.per_line and not self.input:
            p.append("--per_line scores the lines of a text file: give it with --input=FILE")
        if self.drop_unknown and not self.input:
            p.append("--drop_unknown drops characters of an --input file: give it with --input=FILE")
        if self.per_line and self.input and Path(self.per_line).resolve() == Path(self.input).resolve():
            p.append(f"--per_line={self.per_line} is the --input file itself, which the scores would replace: "
                     f"name another file, e.g. --per_line=scores.jsonl")
        if self.per_line and Path(self.per_line).suffix.lower() not in (".jsonl", ".tsv"):
            p.append(f"--per_line writes JSON lines or a table: name the file OUT.jsonl or OUT.tsv, "
                     f"got {self.per_line}")
        if not self.out_dir and self.init_from == "resume":
            p.append("--out_dir must name the folder holding ckpt.pt")
        return p


# ---------------------------------------------------------------------------- text and tokens

def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file, read as prepare.py reads its input (documents.as_text: line
    ends as "\n", no leading byte-order mark), so bytes and characters count that text;
    a bad byte is named with its line and offset."""
    if path.is_dir():
        raise UserError(f"--input={path} is a folder; eval.py scores one file: join its files into one "
                        f"(e.g. `cat {path}/*.txt > all.txt`) or name one of them")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"--input file {path} not found") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return text_of(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(not_utf8(str(path), raw[:4], e.start, raw.count(b"\n", 0, e.start) + 1)) from None


def unknown_chars(tokenizer: Tokenizer, text: str, path: Path, drop: bool) -> str:
    """The characters of text a char-level model never saw ("" for other models), in the order
    they first appear. Unless drop (--drop_unknown), they are refused: all named, the first one
    with its line."""
    if tokenizer.chars is None:
        return ""
    known = set(tokenizer.chars) | ({"\n"} if tokenizer.documents else set())  # line ends cut documents
    unknown = "".join(sorted(set(text) - known, key=text.index))
    if unknown and not drop:
        line = text.count("\n", 0, text.index(unknown[0])) + 1
        shown = errors.listed(map(repr, unknown), 20, " ")
        raise UserError(f"{path} holds {len(unknown)} character(s) the char-level model never saw: {shown} (the "
                        f"first on line {line}); --drop_unknown scores the text without them (each --per_line "
                        f"record then counts its dropped characters), or train on text that has them")
    return unknown


def input_documents(tokenizer: Tokenizer) -> str | None:
    """How --input is cut into documents for this model: as prepare.py cut its training text
    (--documents=line or blank), and for a model trained on JSONL records one per line."""
    return "line" if tokenizer.documents == "jsonl" else tokenizer.documents


def text_units(text: str, documents: str | None) -> list[tuple[int, str]]:
    """(first line number, text) of what --per_line scores: each non-blank line, or each document
    of a documents model (as prepare.py cuts them)."""
    if documents:
        docs, units = list(split_documents([text], documents)), []
        lines = text.split("\n")
        n = 0  # the line where the next document starts
        for doc in docs:
            first = doc.split("\n", 1)[0]
            while lines[n] != first:
                n += 1
            units.append((n + 1, doc))
            n += doc.count("\n") + 1
        return units
    return [(n + 1, line) for n, line in enumerate(text.split("\n")) if line.strip()]


def encode_text(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """The token ids of a whole text as prepare.py writes a split: in documents mode
    [eot] doc [eot] doc ... doc [eot]; otherwise the text's ids."""
    if not tokenizer.documents:
        return tokenizer.encode_to_numpy(text).astype(np.int64)
    ids = [[tokenizer.eot_id]]
    for doc in split_documents([text], input_documents(tokenizer)):
        ids += [tokenizer.encode_to_numpy(doc).astype(np.int64), [tokenizer.eot_id]]
    return np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])


def encode_unit(tokenizer: Tokenizer, text: str, ends: bool = True) -> tuple[np.ndarray, int]:
    """The ids that score one line (or document) on its own, and how many of them are context
    only: after the boundary up to the closing one (documents), or after a line end up to the
    line's own end (ends: False for a file's last line without one); without either in the
    vocabulary, the first token is the context."""
    body = tokenizer.encode(text)
    if tokenizer.documents:
        return np.array([tokenizer.eot_id, *body, tokenizer.eot_id], dtype=np.int64), 1
    newline = tokenizer.encode("\n", drop_unknown=True)
    return np.array([*newline, *body, *(newline if ends else [])], dtype=np.int64), max(1, len(newline))


def token_sizes(tokenizer: Tokenizer, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per token id: the UTF-8 bytes it stands for, and the characters that start in them (bytes
    that are not continuation bytes 10xxxxxx), so both add up over any run of tokens.
    Special tokens (the document boundary) and the model's padding ids stand for nothing."""
    n_bytes, n_chars = np.zeros(vocab_size, np.int64), np.zeros(vocab_size, np.int64)
    if tokenizer.chars is not None:
        for i, c in enumerate(tokenizer.chars):
            n_bytes[i], n_chars[i] = len(c.encode("utf-8")), 1
        return n_bytes, n_chars
    enc = tokenizer.encoding
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    for i in range(min(enc.n_vocab, vocab_size)):
        if i in special:
            continue
        try:
            b = enc.decode_single_token_bytes(i)
        except KeyError:  # a gap in the vocabulary
            continue
        n_bytes[i], n_chars[i] = len(b), sum((x & 0xC0) != 0x80 for x in b)
    return n_bytes, n_chars


# ---------------------------------------------------------------------------- scoring

def windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of n ids: (start, end, scored_from). A window reads ids[start:end]
    and predicts ids[start + 1:end + 1]; the predictions of inputs at scored_from..end-1 are the
    ones it scores, so over all windows every id but the first is scored once."""
    out, scored_to = [], 0
    for start in range(0, max(n - 1, 0), stride):
        end = min(start + block_size, n - 1)
        out.append((start, end, scored_to))
        scored_to = end
        if end == n - 1:
            break
    return out


def document_windows(ids: np.ndarray, eot: int, block_size: int) -> list[tuple[int, int, int]]:
    """windows() for a documents model: each window starts where a document does (its boundary
    token), as train.py's rows do, so every token is scored with its own document's context,
    positions counted from that document's start. The next window starts at the document the
    last one cut, read again as context; a document longer than block_size goes on in windows
    that start every block_size tokens into it, positions from 0 again (train.py's rows of a
    long document). Windows that start mid-document would give its tokens no beginning and
    positions from their window's start: on records shorter than a block that scored 2.57
    where each record alone scored 2.37."""
    starts = np.flatnonzero(ids == eot)
    out, start, scored_to, n = [], 0, 0, len(ids)
    while True:
        end = min(start + block_size, n - 1)
        out.append((start, end, scored_to))
        scored_to = end
        if end == n - 1:
            return out
        first = int(starts[np.searchsorted(starts, end, side="right") - 1]) if len(starts) else 0  # ids[end]'s document
        start = first if first > start else end  # its start, or on into a long document


class Scorer:
    """Negative log-likelihood (nats) of each predicted token, batch by batch."""

    def __init__(self, model, precision: hardware.Precision, batch_size: int, int8: bool, documents_eot=None):
        self.model, self.precision = model, precision
        self.block_size = model.config.block_size
        self.batch_size = batch_size or auto_batch_size(model.config)
        self.eot = documents_eot  # in documents mode: positions restart at this id
        self.forward_model = fast_decode.quantized(model) if int8 else model  # int8: the same GPT, block matrices int8

    @torch.inference_mode()
    def nll(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """x, y (B, T) ids, y = -1 where nothing is scored -> nats (B, T), 0 there."""
        x = torch.from_numpy(x).to(self.precision.device)
        y = torch.from_numpy(y).to(self.precision.device)
        positions = document_positions(x.cpu(), self.eot).to(x.device) if self.eot is not None else None
        with self.precision.autocast():
            logits, _ = self.forward_model(x, y.clamp(min=0), positions=positions)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
        return loss.view(y.shape).double().cpu().numpy()

    def plan(self, ids: np.ndarray, stride: int) -> list[tuple[int, int, int]]:
        """The windows that score ids: by documents for a documents model, else by stride."""
        if self.eot is not None:
            return document_windows(ids, self.eot, self.block_size)
        return windows(len(ids), self.block_size, stride)

    def sequence(self, ids: np.ndarray, stride: int, progress=None) -> np.ndarray:
        """nats of predicting ids[1:] (len(ids) - 1 values), by windows (see windows())."""
        out = np.zeros(max(len(ids) - 1, 0))
        plan = self.plan(ids, stride)
        full = [w for w in plan if w[1] - w[0] == self.block_size]
        rest = [w for w in plan if w[1] - w[0] != self.block_size]  # at most the last one
        T = self.block_size
        for i in range(0, len(full), self.batch_size):
            batch = full[i:i + self.batch_size]
            starts = np.array([s for s, _, _ in batch])
            x = ids[starts[:, None] + np.arange(T)]
            y = ids[starts[:, None] + np.arange(1, T + 1)].copy()
            for row, (start, end, scored_from) in enumerate(batch):
                y[row, :scored_from - start] = -1
            nats = self.nll(x, y)
            for row, (start, end, scored_from) in enumerate(batch):
                out[scored_from:end] = nats[row, scored_from - start:end - start]
            if progress is not None:
                progress.update(len(batch))
        for start, end, scored_from in rest:
            y = ids[None, start + 1:end + 1].copy()
            y[0, :scored_from - start] = -1
            out[scored_from:end] = self.nll(ids[None, start:end], y)[0, scored_from - start:]
            if progress is not None:
                progress.update(1)
        return out

    def units(self, units: list[tuple[np.ndarray, int]], stride: int) -> list[np.ndarray]:
        """For each (ids, context) the nats of its tokens after the context. Units that fit one
        window are scored together, padded on the right (causal attention: the padding changes
        nothing before it); longer ones by windows."""
        out = [None] * len(units)
        short = sorted((i for i, (ids, _) in enumerate(units) if len(ids) - 1 <= self.block_size),
                       key=lambda i: len(units[i][0]))
        for i, (ids, context) in enumerate(units):
            if len(ids) - 1 > self.block_size:
                out[i] = self.sequence(ids, stride)[context - 1:]
        for b in range(0, len(short), self.batch_size):
            batch = short[b:b + self.batch_size]
            T = max(len(units[i][0]) - 1 for i in batch)
            x, y = np.zeros((len(batch), T), np.int64), np.full((len(batch), T), -1, np.int64)
            for row, i in enumerate(batch):
                ids, context = units[i]
                x[row, :len(ids) - 1] = ids[:-1]
                y[row, context - 1:len(ids) - 1] = ids[context:]
            nats = self.nll(x, y)
            for row, i in enumerate(batch):
                ids, context = units[i]
                out[i] = nats[row, context - 1:len(ids) - 1]
        return out


def summary(nats: float, tokens: int, n_bytes: int, n_chars: int) -> dict:
    """The figures of a scored text from its summed nats (see the module docstring)."""
    loss = nats / tokens if tokens else math.nan
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else math.nan,
            "bits_per_char": nats / math.log(2) / n_chars if n_chars else math.nan,
            "logprob": -nats, "tokens": tokens, "bytes": n_bytes, "chars": n_chars}


# ---------------------------------------------------------------------------- setup

def load_for_eval(cfg: EvalConfig, device: str):
    """(model, tokenizer, the dataset it was trained on or None, its data_dir): from out_dir (a
    checkpoint, or a Hugging Face folder) or from --init_from (a Hugging Face folder or name)."""
    if cfg.init_from == "resume":
        model, tokenizer, info = load(cfg.out_dir, device)
        if info["iter_num"] is None:  # a Hugging Face folder: it names no dataset
            return model, tokenizer, None, "data"
        return model, tokenizer, info["config"].get("dataset"), info["config"].get("data_dir", "data")
    model, tokenizer, _ = load_hf(cfg.init_from, device)
    return model, tokenizer, None, "data"


def split_ids(cfg: EvalConfig, tokenizer: Tokenizer, trained_on: str | None, trained_dir: str):
    """The ids of the split to score, and a name for it."""
    name = cfg.dataset or trained_on
    if not name:
        raise UserError(f"which text? --init_from={cfg.init_from} names no dataset: pass --dataset=NAME "
                        f"(prepared with its tokenizer) or --input=FILE")
    data = Dataset(cfg.data_dir or trained_dir, name)
    theirs = Tokenizer.from_description(data.meta).describe()
    ours = tokenizer.describe()
    if differ := tokenizer_mismatch(ours, theirs):
        raise UserError(f"dataset {name!r} was prepared with another tokenizer than the model's: {differ}; "
                        f"score it with --input on its text, or prepare it with the model's tokenizer")
    ids = np.fromfile(data.paths[cfg.split], dtype=data.dtype).astype(np.int64)
    in_loss = None  # instruction records: the answers only, as in training (the loss mask prepare.py wrote)
    if data.mask_paths:
        in_loss = np.fromfile(data.mask_paths[cfg.split], dtype=np.uint8).astype(bool)
    return ids, f"the {cfg.split} split of {name}", in_loss


def write_per_line(path: Path, records: list[dict]):
    """JSONL (one object per line), or TSV with a header when the name ends in .tsv."""
    keys = ["line", "tokens", "bytes", "loss", "bits_per_byte", "logprob", *(["unknown"] if records and "unknown" in records[0] else []), "text"]
    try:
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            if path.suffix.lower() == ".tsv":  # tabs, line ends and backslashes in the text escaped with a
                # backslash, and a text holding a quote quoted (csv's rule: pandas.read_csv and csv.reader read it whole)
                rows = csv.writer(f, delimiter="\t", lineterminator="\n")
                rows.writerow(keys)
                for r in records:
                    text = r["text"].replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
                    rows.writerow([*(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys[:-1]), text])
            else:  # (a line with no bytes left, its characters dropped, has no bits per byte: null, not NaN)
                for r in records:
                    f.write(json.dumps({k: None if isinstance(r[k], float) and math.isnan(r[k]) else r[k] for k in keys},
                                       ensure_ascii=False) + "\n")
    except OSError as e:
        raise UserError(f"cannot write --per_line file {path}: {e.strerror or e}") from None


def check_writable(path: Path, input_path: Path):
    """Refuse a --per_line file that could not be written, or that is the --input file under
    another name (a link), before the model loads and scores."""
    where = path.parent
    if path.exists() and input_path.exists() and os.path.samefile(path, input_path):
        raise UserError(f"--per_line={path} is the --input file itself, which the scores would replace: "
                        f"name another file, e.g. --per_line=scores.jsonl")
    if path.is_dir():
        raise UserError(f"--per_line {path} is a folder; name a file in it, such as {path / 'scores.jsonl'}")
    if blocker := durable.file_in_the_way(path):
        raise UserError(f"cannot write --per_line file {path}: {blocker} is a file, not a folder")
    if not where.is_dir():
        raise UserError(f"cannot write --per_line file {path}: its folder {where} does not exist; create it first")
    if not os.access(path if path.exists() else where, os.W_OK):
        raise UserError(f"cannot write --per_line file {path}: no permission to write "
                        f"{'it' if path.exists() else f'in {where}'}")


def main(argv=None):
    cfg, explicit = parse_config(EvalConfig, argv, prog="eval.py")
    check_one_model(cfg.init_from, explicit)
    if cfg.input and "split" in explicit:
        raise UserError("--input and --split each choose the text to score: pass one of them")
    hardware.set_cpu_threads()
    precision = hardware.resolve(cfg.device, cfg.dtype)
    if "dtype" not in explicit:  # float32 is eval.py's own choice, not the user's
        precision = replace(precision, reason=precision.reason.replace(
            f"dtype {cfg.dtype} (as requested)", f"dtype {cfg.dtype} (eval.py's default; --dtype=auto or bfloat16 to change)"))
    if precision.device_type == "cpu":  # each batch's activations reuse the last one's memory
        hardware.keep_freed_memory()
    if cfg.int8 and precision.device_type != "cpu":
        raise UserError("--int8 runs on the cpu only (fast_decode's int8 kernel); add --device=cpu")
    if cfg.int8 and not fast_decode.int8_available():
        raise UserError("--int8 needs torch's int8 weight-only kernel, which this torch build lacks")
    text = read_utf8(Path(cfg.input)) if cfg.input else None  # a bad file fails before loading
    if text is not None and not text.strip():
        raise UserError(f"--input={cfg.input} holds no text to score (it is empty or only whitespace)")
    if cfg.per_line:
        check_writable(Path(cfg.per_line), Path(cfg.input))
    model, tokenizer, trained_on, trained_dir = load_for_eval(cfg, precision.device)
    block_size = model.config.block_size
    stride = cfg.stride or block_size
    if stride > block_size:
        raise UserError(f"--stride ({stride}) is longer than the model's block_size ({block_size}); "
                        f"lower it (0 = block_size)")
    if tokenizer.documents and cfg.stride:
        raise UserError("--stride is for plain text: a documents model is scored in windows that start "
                        "at its documents (each token with its own document's context); drop --stride")
    if cfg.int8 and (why := fast_decode.supported(model)):
        raise UserError(f"--int8 cannot run this model: {why}")
    if text is not None:
        if tokenizer.documents == "jsonl" and Path(cfg.input).suffix.lower() == ".jsonl":
            raise UserError(f"--input={cfg.input}: eval.py scores plain text, one document per line for a model "
                            f"trained on JSONL records; put each record's text on a line of a .txt file (or "
                            f"prepare the records and score them with --dataset=NAME)")
        unknown = unknown_chars(tokenizer, text, Path(cfg.input), cfg.drop_unknown)
        drop = {ord(c): None for c in unknown}
        if unknown:
            shown = " ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            print(f"note: --drop_unknown dropped {len(text) - len(text.translate(drop)):,} occurrence(s) of {len(unknown)} "
                  f"character(s) the model never saw: {shown}", file=sys.stderr)
        ids, what, in_loss = encode_text(tokenizer, text.translate(drop)), cfg.input, None
    else:
        ids, what, in_loss = split_ids(cfg, tokenizer, trained_on, trained_dir)
    if len(ids) < 2:
        raise UserError(f"{what} holds {len(ids)} token(s); there is nothing to predict")
    print(f"precision: {precision.reason}", file=sys.stderr)

    scorer = Scorer(model, precision, cfg.batch_size, cfg.int8,
                    tokenizer.eot_id if tokenizer.documents else None)
    n_bytes, n_chars = token_sizes(tokenizer, model.config.vocab_size)
    n_windows = len(scorer.plan(ids, stride))
    progress = None
    if sys.stderr.isatty() and n_windows > 4 * scorer.batch_size:
        from tqdm import tqdm
        progress = tqdm(total=n_windows, unit="window", file=sys.stderr, leave=False)
    nats = scorer.sequence(ids, stride, progress)
    if progress is not None:
        progress.close()
    targets = ids[1:]
    if in_loss is not None:  # the answers (and their end) of instruction records only
        nats, targets = nats[in_loss[1:]], targets[in_loss[1:]]
    result = summary(float(nats.sum()), len(targets), int(n_bytes[targets].sum()), int(n_chars[targets].sum()))
    result.update(text=what, block_size=block_size, stride=stride, dtype=precision.dtype + (" int8" if cfg.int8 else ""),
                  scored="answers" if in_loss is not None else "all")

    if cfg.per_line:
        units = text_units(text, input_documents(tokenizer))
        unended = None if text.endswith("\n") else text.count("\n") + 1  # the last line, if it has no line end
        encoded = [encode_unit(tokenizer, t.translate(drop), ends=line != unended) for line, t in units]
        records = []
        for (line, t), (uids, context), unats in zip(units, encoded, scorer.units(encoded, stride)):
            scored = uids[context:]
            records.append({"line": line, "text": t, **summary(float(unats.sum()), len(scored),
                                                                 int(n_bytes[scored].sum()), int(n_chars[scored].sum())),
                            **({"unknown": len(t) - len(t.translate(drop))} if cfg.drop_unknown else {})})
        write_per_line(Path(cfg.per_line), records)
        result["per_line"] = {"file": cfg.per_line, "lines": len(records)}

    if cfg.json:
        print(json.dumps(result))
        return
    print(f"{what}: {result['tokens']:,} tokens scored, {result['bytes']:,} bytes, {result['chars']:,} characters "
          f"(windows of {block_size} tokens, stride {stride}, {result['dtype']})")
    if in_loss is not None:
        print(f"scored: the answers only ({result['tokens']:,} of {len(ids) - 1:,} tokens), as train.py's val loss: "
              f"the loss mask prepare.py wrote for instruction records")
    print(f"loss {result['loss']:.4f} nats per token, perplexity {result['ppl']:.3f}")
    print(f"bits per byte {result['bits_per_byte']:.4f}, bits per character {result['bits_per_char']:.4f}")
    if cfg.per_line:
        print(f"per-line scores of {len(records):,} lines written to {cfg.per_line}")


if __name__ == "__main__":
    run_main(main)
