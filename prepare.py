"""Prepare a dataset: raw UTF-8 text -> data/<name>/train.bin, val.bin, meta.json.

    python prepare.py shakespeare_char                  # tiny Shakespeare, char-level
    python prepare.py shakespeare                       # tiny Shakespeare, GPT-2 BPE
    python prepare.py --input books/ --name books --tokenizer cl100k_base
    python prepare.py --input combos.txt --name combos --tokenizer char --documents line
    python prepare.py --input combos.txt --name combos_bpe --tokenizer bpe:400 --documents line

train.bin and val.bin are flat little-endian token ids (uint16, or uint32 when the
vocabulary does not fit in 16 bits); the last --val_fraction of the token stream is val,
as in nanoGPT. meta.json describes the tokenizer, the dtype, the split sizes and the
sources (see docs/design.md, contract 1).

Several input files are separate documents. With BPE they are joined by the end-of-text
token; char-level has no such token, so their texts are simply concatenated. Either way
decoding train.bin followed by val.bin gives the documents back exactly: joined by
"<|endoftext|>" (BPE) or by nothing (char). "Exactly" is the text as read: every input, in
every mode, is read as text mode reads it (documents.as_text): "\r\n" and a lone "\r" end
a line as "\n", and a byte-order mark at the start of a file is dropped.

Documents mode (--documents=line: every non-blank line is a document; --documents=blank:
documents are separated by blank lines, i.e. lines of only whitespace; line ends are not
part of a document). Every document starts with a boundary token, which also marks where
the one before ended: <|endoftext|> for tiktoken encodings and trained vocabularies, one
extra id len(chars) for char-level (recorded as eot_id in meta.json; no character can take
it). Each split ends with one more boundary, so the last document's end is marked too:
a split is [eot] doc [eot] doc ... doc [eot]. The val split takes whole documents: the last
--val_fraction of them after a shuffle seeded by --seed, or simply the last ones with
--shuffle=false (logs, where order matters); both splits keep the input order. meta.json
records "documents" (the mode; train.py trains in document mode when it is set), the
document counts and length statistics; prepare warns when many documents are longer than
--block_size. Decoding a split and cutting it at the boundaries gives back its documents
exactly. --documents=file (the default) is the behaviour described above: one document
per file, val is the token tail.

--tokenizer=bpe:N trains a byte-level BPE vocabulary of N ids (256 bytes, N - 257 merges
and <|endoftext|>) with Hugging Face tokenizers' BpeTrainer on the training text. Text is
split into lines before BPE (tokenizer.LINE_PATTERN): merges may cross spaces, so a
record's recurring words ("Lead Hook", " - ") become single tokens; a line over 1,000
characters reaches the trainer in pieces (cut_long_lines). The trainer sees only
the first --bpe_sample_chars characters (10M by default) of the training documents (in
file mode: of the text without its last --val_fraction), so its memory stays bounded on
any corpus. The vocabulary goes into meta.json as tiktoken ranks (base64 bytes of each
token in rank order) plus the split pattern; train.py copies it into the checkpoint, and
tiktoken encodes and decodes with it everywhere. Byte-level: any text, emoji included, decodes
back exactly.

Inputs of any size stream with bounded memory in two passes: pass 1 checks the UTF-8,
hashes each file and collects the characters; pass 2 encodes chunks of text on all cores
in worker processes and appends the ids to one stream, which is then split by
moving its tail into val.bin. Everything is written into a hidden temporary folder that
is swapped into place at the end, so an interrupted run leaves the previous dataset.
"""
import errors
errors.starting(__name__)  # a missing requirement or a Ctrl-C while numpy imports: one line, no traceback
import argparse
import codecs
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import tiktoken
from tqdm import tqdm

import durable
import runlock
from documents import BOM, UTF16_BOMS, as_text, not_utf8, split_documents
from errors import UserError, listed, quoted, run_main
import template
from tokenizer import BPE, CHAR, LINE_PATTERN, NAMED_DATASETS, Tokenizer, bytes_to_unicode

FORMAT_VERSION = 1
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
OUTPUTS = ("train.bin", "val.bin", "meta.json")  # what a run writes into data/<name>/
MASK_OUTPUTS = ("train_mask.bin", "val_mask.bin")  # and beside them for JSONL records: the loss masks
DOCUMENT_MODES = ("file", "line", "blank")  # --documents: what one document is
BPE_MIN_VOCAB = 257  # a trained vocabulary holds the 256 bytes and <|endoftext|> at least
LONG_DOCUMENTS_WARNING = 0.1  # warn when more than this share of documents exceed --block_size
MAX_WORKERS = 61 if sys.platform == "win32" else None  # the most processes a pool takes on Windows


# ---------------------------------------------------------------- finding the text

def download_shakespeare(dest: Path, final: Path) -> None:
    """Download tiny Shakespeare to `dest`, checking its sha256. `final`: where it will live."""
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=10) as response:
            data = response.read()
    except Exception as e:  # URLError, timeouts, DNS failures: all mean "no usable network"
        raise UserError(f"could not download tiny Shakespeare from {SHAKESPEARE_URL} ({e}); "
                        f"put the file at {final} or pass --input PATH") from None
    if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        raise UserError(f"the download from {SHAKESPEARE_URL} has the wrong sha256; "
                        "try again, or pass a local copy with --input PATH")
    dest.write_bytes(data)


def list_files(inputs: list[str]) -> list[Path]:
    """The files named, and the files under the folders named (recursively, no hidden), sorted
    by name as Linux sorts paths, capitals first, on every OS (Windows' paths sort without
    case): a folder gives the same dataset, the same val split, wherever it is prepared."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted((p for p in path.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                           key=lambda p: p.relative_to(path).parts)
            if not found:
                raise UserError(f"no files found in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input not found: {path}")
    return files


# how images and archives start that may hold no NUL early on (programs, audio, ... do)
BINARY_STARTS = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"PK\x03\x04", b"%PDF-", b"\x1f\x8b", b"\xfd7zXZ",
                 b"7z\xbc\xaf")


def file_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096)


def looks_binary(head: bytes) -> bool:
    """Whether a file that failed as UTF-8 (head: its first bytes) starts as images and archives
    do, or holds a NUL early on (a binary file's headers do; text with a stray NUL decodes, so
    it never gets here)."""
    return head.startswith(BINARY_STARTS) or b"\x00" in head


def read_text(path: Path, read_size: int, progress=None, sha=None):
    """The text of a UTF-8 file piece by piece, read as every tool reads text
    (documents.as_text: line ends as "\n", no leading byte-order mark), so a CRLF file
    gives the same dataset as its LF copy. The bytes stream through in reads of read_size."""
    return as_text(read_utf8(path, read_size, progress, sha))


def read_utf8(path: Path, read_size: int, progress=None, sha=None):
    """Yield the decoded UTF-8 of a file piece by piece (an incremental decoder keeps
    characters whole across reads); non-UTF-8 bytes raise UserError with their offset.
    Updates the tqdm bar `progress` and the hash `sha` with the bytes read."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0  # bytes handed to the decoder so far, and the line ends among them
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(read_size)
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the last read
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    head = file_head(path)
                    if looks_binary(head) and not head.startswith(UTF16_BOMS):
                        raise UserError(f"{path} is not a text file (an image, an archive, a program?); leave it "
                                        f"out of --input (move it out of the folder)") from None
                    line = lines + data[:max(0, e.start - pending)].count(b"\n") + 1
                    raise UserError(not_utf8(str(path), head, offset - pending + e.start, line)) from None
                offset += len(data)
                lines += data.count(b"\n")
                if sha is not None:
                    sha.update(data)
                if progress is not None:
                    progress.update(len(data))
                if text:
                    yield text
                if not data:
                    return
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def iter_documents(files: list[Path], mode: str, read_size: int, progress=None, sha=None):
    """Every document of every file, in order (see split_documents)."""
    for path in files:
        yield from split_documents(read_text(path, read_size, progress, sha), mode)


def scan(files: list[Path], read_size: int, want_chars: bool,
         documents: str = "file") -> tuple[list[dict], int, set]:
    """Pass 1: size and sha256 of each file, UTF-8 check, character count and set. In
    documents mode each source also gets its document count, and the characters are those
    of the documents (line ends between them need no id)."""
    sources, n_chars, chars = [], 0, set()
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="scan", disable=None) as bar:
        for path in files:
            sha = hashlib.sha256()
            source = {"path": str(path), "bytes": path.stat().st_size}
            if documents == "file":
                for text in read_text(path, read_size, bar, sha):
                    n_chars += len(text)
                    if want_chars:
                        chars.update(text)
            else:
                n_docs = 0
                for doc in split_documents(read_text(path, read_size, bar, sha), documents):
                    n_chars += len(doc)
                    n_docs += 1
                    if want_chars:
                        chars.update(doc)
                source["documents"] = n_docs
            sources.append({**source, "sha256": sha.hexdigest()})
    return sources, n_chars, chars


# ---------------------------------------------------------------- chunking for BPE

# tiktoken splits text with a regex before BPE, and merges never cross a split, so
# encoding chunk by chunk gives the one-shot ids exactly when each cut falls where the
# regex cuts anyway *and* every match left of the cut ends in the same place when the
# text stops there. For the gpt2, cl100k_base and o200k_base patterns that holds:
# 1. right after "\n" with a non-space before and a letter or digit after: no pattern
#    runs from a newline into a letter or digit, and the lone "\n" is its own piece both
#    ways (`\s` one-shot, `\s++$` at the end of a chunk). A space before the "\n", or a
#    "/" after it (o200k: punctuation + [\r\n/]*), would make the pieces differ.
# 2. right before a space that follows a non-space and precedes a letter or digit: the
#    space starts the next piece (" word", " 42" or " ") and no piece takes a
#    non-space and then a space.
# The regexes find the *last* such cut in a buffer (greedy .* backtracks from the end).
LAST_LINE_CUT = re.compile(r".*\S\n(?=[^\W_])", re.S)
LAST_SPACE_CUT = re.compile(r".*\S(?= [^\W_])", re.S)


def chunk_text(pieces, chunk_size: int, max_chunk: int | None = None):
    """Regroup text pieces into chunks of about chunk_size characters, cut only where the
    cut cannot change the BPE tokens (see above). A buffer that reaches max_chunk with no
    such place (one giant line of symbols, say) is cut hard: decoding stays exact, only
    the tokens around that cut may differ from a one-shot encode."""
    max_chunk = max_chunk or 16 * chunk_size
    buf = ""
    for piece in pieces:
        buf += piece
        while len(buf) >= chunk_size:
            m = LAST_LINE_CUT.match(buf, chunk_size // 2) or LAST_SPACE_CUT.match(buf, chunk_size // 2)
            if m:
                cut = m.end()
            elif len(buf) >= max_chunk:
                cut = chunk_size
            else:
                break  # read more text and look again
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


# ---------------------------------------------------------------- documents: the val split

def choose_val_documents(n_docs: int, val_fraction: float, shuffle: bool, seed: int) -> np.ndarray:
    """A bool per document, True for val: the last val_fraction of the documents after a
    seeded shuffle (or in input order). One byte per document (plus the shuffle's 8 while
    it is drawn), so a split of 100M documents costs about 1 GB for a moment."""
    n_train = int(n_docs * (1 - val_fraction))  # nanoGPT: data[:int(n*0.9)]
    if n_train < 1 or n_train == n_docs:
        raise UserError(f"the input has {n_docs:,} document(s): too few to give train and val whole "
                        f"documents with --val_fraction={val_fraction}; add documents or change --val_fraction")
    is_val = np.zeros(n_docs, dtype=bool)
    if shuffle:
        is_val[np.random.default_rng(seed).permutation(n_docs)[n_train:]] = True
    else:
        is_val[n_train:] = True
    return is_val


# ---------------------------------------------------------------- training a vocabulary

def parse_bpe_size(name: str) -> int | None:
    """N of --tokenizer=bpe:N (None for any other tokenizer name)."""
    if not name.startswith(BPE):
        return None
    size = name[len(BPE) + 1:] if name.startswith(BPE + ":") else ""
    if not size.isdigit() or int(size) < BPE_MIN_VOCAB:
        raise UserError(f"--tokenizer={name}: a trained vocabulary is bpe:N with N an integer of at "
                        f"least {BPE_MIN_VOCAB} (the 256 bytes and the boundary token), e.g. bpe:400")
    return int(size)


def names_a_vocabulary(name: str) -> bool:
    """Whether --tokenizer names a prepared dataset or a run (a path: data/NAME, out-run/) whose
    vocabulary to use, rather than a tokenizer (char, bpe:N, a tiktoken encoding)."""
    if name == CHAR or name.startswith(BPE + ":") or name in tiktoken.list_encoding_names():
        return False
    return "/" in name or "\\" in name or name.endswith((".json", ".pt")) or Path(name).expanduser().is_dir()


def vocabulary_of(name: str) -> Tokenizer:
    """--tokenizer=PATH: the vocabulary of a prepared dataset (its folder or meta.json) or of a
    trained model (a run's folder, its ckpt.pt): text prepared with it trains, finetunes and is
    scored by that model, whose own vocabulary (char-level, bpe:N) came from other text."""
    path = Path(name).expanduser()
    meta = path / "meta.json" if path.is_dir() else path
    folder = path if path.is_dir() else path.parent
    try:
        if meta.name == "meta.json" and meta.is_file():
            description = json.loads(meta.read_text(encoding="utf-8"))
        elif path.is_dir() and (path / "ckpt.pt").is_file() or path.name == "ckpt.pt" and path.is_file():
            import checkpoint  # torch, only for a run's vocabulary
            description = checkpoint.load(path)["tokenizer"]
        elif (folder / "config.json").is_file() or (folder / "tokenizer.json").is_file():
            raise UserError(f"--tokenizer={name} is a Hugging Face model's folder: for a GPT-2 (ours after "
                            f"export.py too) prepare with --tokenizer gpt2, or with the folder of the run it "
                            f"was exported from")
        else:
            raise UserError(f"--tokenizer={name}: no prepared dataset (meta.json) or run (ckpt.pt) there; name a "
                            f"dataset's folder (data/NAME) or a run's --out_dir to use its vocabulary, or a "
                            f"tokenizer: char, gpt2, r50k_base, cl100k_base, o200k_base or bpe:N")
        return Tokenizer.from_description(description)
    except UserError as e:
        raise UserError(str(e) if str(e).startswith("--tokenizer=") else f"--tokenizer={name}: {e}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"--tokenizer={name}: cannot read its vocabulary ({type(e).__name__}: {e})") from None


def say_vocab_size(tokenizer: Tokenizer, source: str | None):
    print(f"vocab size: {tokenizer.vocab_size:,} ({tokenizer.name}{f', the vocabulary of {source}' if source else ''})")


def check_vocabulary(tokenizer: Tokenizer, source: str, chars, documents: str | None):
    """The text (its characters, for a char-level vocabulary; documents: its mode) fits the
    vocabulary of --tokenizer=source, so that its model reads the ids as it was trained to."""
    if tokenizer.chars is not None:
        if documents and tokenizer.eot_id is None:
            fix = ("records need one: a model of plain text cannot learn them (docs/finetune.md)"
                   if documents == JSONL else "prepare this text as plain text too (without --documents)")
            raise UserError(f"this text's documents start with a boundary token, but the vocabulary of {source} "
                            f"has none (it was prepared as plain text); {fix}")
        if not documents and tokenizer.eot_id is not None:
            raise UserError(f"the vocabulary of {source} has a document-boundary token (it was prepared as "
                            f"documents or JSONL records): prepare this text the same way (--documents=line or "
                            f"blank, or records)")
        if unknown := sorted(set(chars) - set(tokenizer.chars)):
            raise UserError(f"the text has {len(unknown)} character(s) the vocabulary of {source} lacks: "
                            f"{listed(map(repr, unknown), 12)}; a model of that vocabulary cannot read them: "
                            f"remove them from the text, or prepare it with a vocabulary of its own")
    tokenizer.documents = documents


def bounded(texts, max_chars: int):
    """The texts, until max_chars characters have been handed out (the last one cut)."""
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)


def say_bpe_training(vocab_size: int, chars: int) -> None:
    """The one line before the silent part: tokenizers' trainer shows no progress, and a Ctrl-C
    is answered only when it returns."""
    print(f"training a BPE vocabulary of {vocab_size:,} tokens on up to {chars:,} characters (tens of "
          f"seconds for 10M; a Ctrl-C waits for it)...", flush=True)


BPE_PIECE_CHARS = 1000  # a longer line reaches the BPE trainer cut into pieces of about this many characters


def cut_long_lines(texts, limit: int = BPE_PIECE_CHARS):
    """The texts for the BPE trainer, with every line longer than limit cut into pieces (at a
    space where there is one in the second half, else at limit) that the trainer sees apart:
    its time grows with the square of a line's length (one line of 340,000 characters took
    minutes, with Ctrl-C unanswered), and no merge of a vocabulary spans a thousand characters.
    The vocabulary still encodes every line whole."""
    for text in texts:
        if len(text) <= limit or max(map(len, text.split("\n"))) <= limit:
            yield text
            continue
        pieces = []
        for line in text.split("\n"):
            while len(line) > limit:
                cut = line.rfind(" ", limit // 2, limit)
                cut = limit if cut <= 0 else cut
                pieces.append(line[:cut])
                line = line[cut:]
            pieces.append(line)
        yield "\n".join(pieces)


def train_bpe(texts, vocab_size: int, documents: str | None) -> Tokenizer:
    """A byte-level BPE vocabulary of vocab_size ids trained on texts (an iterable of str)
    with HF tokenizers' BpeTrainer, returned as a tiktoken-backed Tokenizer: bytes 0..255
    take ranks 0..255, each merge the next rank in the trainer's order (what tiktoken's
    encoder assumes: it merges the pair whose result has the lowest rank), and
    <|endoftext|> the last id."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from tokenizers import Regex
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([  # split as tiktoken will, then bytes as characters
        pre_tokenizers.Split(Regex(LINE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(cut_long_lines(texts), trainer)
    merges = json.loads(hf.to_str())["model"]["merges"]
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = [bytes([b]) for b in range(256)]
    known = set(ranks)
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge  # older versions: "a b"
        token = bytes(byte_of[c] for c in left + right)
        if token not in known:
            known.add(token)
            ranks.append(token)
    if len(ranks) + 1 < vocab_size:
        raise UserError(f"--tokenizer=bpe:{vocab_size} asks for more tokens than the training text can "
                        f"make: it supports {len(ranks) + 1} (every pair of adjacent tokens already merged); "
                        f"use --tokenizer=bpe:{len(ranks) + 1} or less, or more text (it learns from the first "
                        f"--bpe_sample_chars characters of the training text)")
    return Tokenizer.bpe_from_ranks(ranks[:vocab_size - 1], documents=documents)


# ---------------------------------------------------------------- encoding and writing

_worker_tokenizer = None  # each encoder process builds its own tokenizer once


def _start_worker(description: dict, parent: int) -> None:
    # Ctrl-C in a terminal reaches every process of its group: the parent alone handles it
    # (it stops the pool and removes its temporary folder); a worker would print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, which a fork copies
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_description(description)


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (kill -9, the OOM killer) would wait for work forever:
    it leaves within a second or two instead."""
    while True:
        time.sleep(1)
        if os.getppid() != parent or not psutil.pid_exists(parent):  # (reparented on POSIX; gone on Windows)
            os._exit(1)


STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])


@contextlib.contextmanager
def stops_held():
    """Ctrl-C and SIGTERM are held for the duration, where one would leave things half done
    (the list yielded collects them), then delivered to the handlers that were there before."""
    held = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum)) for sig in STOP_SIGNALS}
    try:
        yield held
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(held):
            signal.raise_signal(sig)


class EncoderPool(ProcessPoolExecutor):
    """num_workers encoder processes, each with its own copy of tokenizer, started at once.
    A Ctrl-C (or SIGTERM) while they are being forked is held until they are, then raised
    here: in the parent it could otherwise be lost in a fork hook ("Exception ignored in ..."),
    and a child that has not yet reached _start_worker would print it as a traceback. (Held by
    a Python handler, which forked children inherit; spawned ones, macOS's and Windows',
    ignore Ctrl-C from the first line of this script on: errors.starting.) Leaving the `with`
    block on an error or Ctrl-C drops the chunks still queued instead of encoding them first."""

    def __init__(self, tokenizer: Tokenizer, num_workers: int):
        super().__init__(num_workers, initializer=_start_worker, initargs=(tokenizer.describe(), os.getpid()))
        try:
            with stops_held():
                self.submit(int)  # starts the workers (all of them, under the fork start method)
        except BaseException:
            self.shutdown(cancel_futures=True)
            raise

    def __exit__(self, exc_type, exc, tb):
        # a second Ctrl-C (or a SIGTERM) inside shutdown left the pool half shut down and the
        # process hanging at exit: it is held until the workers have finished their chunk in hand
        with stops_held():
            self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


def _encode_chunk(text: str) -> np.ndarray:
    return _worker_tokenizer.encode_to_numpy(text)


def _encode_documents(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """[eot] doc [eot] doc ... as one array, and the token count of each document."""
    eot = np.array([_worker_tokenizer.eot_id], dtype=np.uint32)
    encoded = [_worker_tokenizer.encode_to_numpy(doc) for doc in docs]
    return (np.concatenate([part for ids in encoded for part in (eot, ids)]),
            np.array([len(ids) for ids in encoded], dtype=np.int64))


def encode_files(files, tokenizer: Tokenizer, out_path: Path, dtype, chunk_size: int,
                 num_workers: int) -> int:
    """Pass 2: encode every file, documents joined by end-of-text (BPE), into one flat
    stream of ids at out_path. Returns the number of tokens written."""
    eot = None if tokenizer.eot_id is None else np.array([tokenizer.eot_id], dtype=dtype)
    total = sum(p.stat().st_size for p in files)
    n_tokens = 0
    # A bounded queue of encodes in flight: worker processes encode while this one reads,
    # cuts and writes, and memory holds a few chunks, never the whole input. Processes, not
    # threads: tiktoken's threads contend with each other, so two threads encode slower than
    # two processes.
    pending: deque = deque()
    with open(out_path, "wb") as out, EncoderPool(tokenizer, num_workers) as pool, \
            tqdm(total=total, unit="B", unit_scale=True, desc="encode", disable=None) as bar:

        def write_oldest():
            nonlocal n_tokens
            item = pending.popleft()
            ids = item.result() if isinstance(item, Future) else item
            out.write(ids.astype(dtype, copy=False).tobytes())
            n_tokens += len(ids)

        for i, path in enumerate(files):
            if i > 0 and eot is not None:
                pending.append(eot)
            for chunk in chunk_text(read_text(path, chunk_size, bar), chunk_size):
                pending.append(pool.submit(_encode_chunk, chunk))
                while len(pending) > 2 * num_workers:
                    write_oldest()
        while pending:
            write_oldest()
    return n_tokens


def encode_documents(files, documents: str, is_val: np.ndarray, tokenizer: Tokenizer, folder: Path,
                     dtype, chunk_size: int, num_workers: int) -> tuple[dict, np.ndarray]:
    """Pass 2 in documents mode: every document, boundary token first, into train.bin or
    val.bin in folder, each split closed by one more boundary. Returns the token count of
    each split and the token count of each document (boundary not counted)."""
    total = sum(p.stat().st_size for p in files)
    n_tokens = {"train": 0, "val": 0}
    lengths = []  # one array per batch of documents
    pending: deque = deque()  # (split, future): written in order, as in encode_files
    batch, batch_chars, batch_split = [], 0, "train"
    with open(folder / "train.bin", "wb") as train_out, open(folder / "val.bin", "wb") as val_out, \
            EncoderPool(tokenizer, num_workers) as pool, \
            tqdm(total=total, unit="B", unit_scale=True, desc="encode", disable=None) as bar:
        outs = {"train": train_out, "val": val_out}

        def write_oldest():
            split, future = pending.popleft()
            ids, doc_lengths = future.result()
            outs[split].write(ids.astype(dtype, copy=False).tobytes())
            n_tokens[split] += len(ids)
            lengths.append(doc_lengths)

        def submit():
            pending.append((batch_split, pool.submit(_encode_documents, batch)))
            while len(pending) > 2 * num_workers:
                write_oldest()

        for i, doc in enumerate(iter_documents(files, documents, chunk_size, bar)):
            split = "val" if is_val[i] else "train"
            if batch and (split != batch_split or batch_chars >= chunk_size):
                submit()
                batch, batch_chars = [], 0
            batch.append(doc)
            batch_chars += len(doc)
            batch_split = split
        if batch:
            submit()
        while pending:
            write_oldest()
        for split, out in outs.items():  # the end of the split's last document
            out.write(np.array([tokenizer.eot_id], dtype=dtype).tobytes())
            n_tokens[split] += 1
    return n_tokens, np.concatenate(lengths)


def document_stats(lengths: np.ndarray, block_size: int) -> dict:
    """Token counts of the documents (boundary not counted), for meta.json."""
    return {"mean": round(float(lengths.mean()), 2), "median": float(np.median(lengths)),
            "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max()),
            "min": int(lengths.min()), "block_size": block_size,
            "longer_than_block_size": int((lengths + 1 > block_size).sum())}


def split_tail(stream: Path, n_keep: int, tail_path: Path, itemsize: int, block: int = 1 << 24) -> None:
    """Move everything after the first n_keep ids of `stream` into tail_path (in blocks)."""
    with open(stream, "r+b") as src, open(tail_path, "wb") as dst:
        src.seek(n_keep * itemsize)
        while data := src.read(block):
            dst.write(data)
        src.truncate(n_keep * itemsize)


def fsync_dir_files(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            durable.fsync_file(p)


def carry_over(old: Path, new: Path) -> None:
    """Keep what the user had in data/<name>/ besides our outputs (input.txt, say): hard
    links where possible, copies otherwise."""
    for entry in old.iterdir():
        if entry.name in OUTPUTS + MASK_OUTPUTS or (new / entry.name).exists():
            continue
        if entry.is_dir():
            try:
                shutil.copytree(entry, new / entry.name, copy_function=os.link)
            except OSError:
                shutil.rmtree(new / entry.name, ignore_errors=True)
                shutil.copytree(entry, new / entry.name)
        else:
            try:
                os.link(entry, new / entry.name)
            except OSError:
                shutil.copy2(entry, new / entry.name)


def swap_into_place(tmp: Path, dest: Path) -> None:
    """Replace dest with tmp: rename the old away, the new in, then delete the old."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-{os.getpid()}-", dir=dest.parent))
        try:
            os.rename(dest, old / dest.name)
        except PermissionError:  # Windows renames no folder with a file open in it (POSIX does)
            old.rmdir()
            raise UserError(f"cannot replace {dest}: a program has a file in it open (a train.py on this "
                            f"dataset, say); let it finish, or prepare under another --name") from None
    try:
        os.rename(tmp, dest)
    except OSError:
        if old is not None:
            os.rename(old / dest.name, dest)
        raise
    durable.fsync_folder(dest.parent)  # the renames survive a power cut (where the OS allows it)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dataset(tmp: Path, dest: Path, meta: dict) -> None:
    """meta.json beside the bins in tmp, everything fsync'd, then tmp swapped into dest."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    fsync_dir_files(tmp)
    if dest.is_dir():
        carry_over(dest, tmp)
    swap_into_place(tmp, dest)


def remove_stale_temps(data_dir: Path, name: str) -> None:
    """Delete hidden temp folders that killed runs of this dataset left behind."""
    for p in data_dir.glob(f".{name}.*"):
        m = re.match(rf"\.{re.escape(name)}\.(?:tmp|old)-(\d+)-", p.name)
        if not m:
            continue
        if not runlock.pid_alive(int(m.group(1))):  # a run that is still going keeps its folder
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- instruction data (JSONL)
# A .jsonl input (or --format=jsonl) holds one JSON record per line: {"text"}, {"prompt",
# "response"} or {"messages"} (see template.py). Each record is one document, [eot] parts...,
# and beside each token bin goes its loss mask: <split>_mask.bin, one uint8 per token, 1
# where the token is a target in the loss (see docs/finetune.md). Records are read twice
# (check, then encode), so memory stays bounded; encoding runs in this process.

JSONL = "jsonl"


def is_jsonl(files: list[Path], fmt: str) -> bool:
    """--format=jsonl, or (auto) every input file ends in .jsonl."""
    if fmt != "auto":
        return fmt == JSONL
    jsonl = [p.suffix.lower() == ".jsonl" for p in files]
    if any(jsonl) and not all(jsonl):
        raise UserError("some inputs are .jsonl and some are not; prepare them separately, or pass "
                        "--format=jsonl (every file holds records) or --format=text")
    return all(jsonl)


def json_read_as_text(files: list[Path], fmt: str) -> Path | None:
    """A .json file read as plain text by default (an Alpaca-style array of records, say), whose
    JSON syntax and keys would become the text: the first such file, for a note."""
    for path in files:
        if fmt == "auto" and path.suffix.lower() == ".json":
            with open(path, "rb") as f:
                if f.read(4096).lstrip()[:1] in (b"[", b"{"):
                    return path
    return None


def read_template(path: str | None) -> dict:
    """The default template, or one from a JSON file with the same four keys."""
    if path is None:
        return dict(template.TEMPLATE)
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # as text: a byte-order mark dropped
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read --template {path}: {e}") from None
    keys = sorted(template.TEMPLATE)
    if not isinstance(loaded, dict) or sorted(loaded) != keys or not all(isinstance(v, str) for v in loaded.values()):
        raise UserError(f"--template {path} must be a JSON object of strings with exactly the keys {', '.join(keys)}")
    if "{content}" not in loaded["user"] or "{content}" not in loaded["system"]:
        raise UserError(f"--template {path}: user and system must hold {{content}}, where the turn's text goes")
    if not loaded["end"].strip():
        raise UserError(f"--template {path}: end must hold more than whitespace (it is where an answer stops)")
    return loaded


def read_records(path: Path, sha=None):
    """(record, kind) for every non-blank line of a JSONL file; any problem is one UserError
    naming the file and line."""
    lineno = 0
    try:
        with open(path, "rb") as f:
            for raw in f:
                if sha is not None:
                    sha.update(raw)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{lineno + 1}: not UTF-8 text") from None
                if lineno == 0:
                    text = text.removeprefix(BOM)  # a byte-order mark some editors write
                # Lines end as text mode ends them (documents.as_text): "\n", "\r\n" or a lone
                # "\r". JSON holds no raw "\r" inside a string, so every other "\r" ends a line.
                for line in text.removesuffix("\n").removesuffix("\r").split("\r"):
                    lineno += 1
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        kind = template.record_kind(record)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                        f"each line must be one JSON object") from None
                    except ValueError as e:
                        raise UserError(f"{path}:{lineno}: {e}") from None
                    yield record, kind
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def scan_jsonl(files: list[Path], tmpl: dict):
    """Pass 1: check every record; sources (size, sha256, record count), the count of each
    kind and the characters of the text the records become."""
    sources, kinds, chars = [], dict.fromkeys(template.KINDS, 0), set()
    for path in files:
        sha, n = hashlib.sha256(), 0
        for record, kind in read_records(path, sha):
            kinds[kind] += 1
            n += 1
            for text, _ in template.record_parts(record, kind, tmpl):
                chars.update(text)
        sources.append({"path": str(path), "bytes": path.stat().st_size, "documents": n, "sha256": sha.hexdigest()})
    if kinds["prompt_response"] or kinds["messages"]:  # what sampling wraps a prompt in, and stops at
        chars.update(tmpl["end"] + tmpl["assistant"])
    return sources, kinds, chars


def iter_records(files: list[Path]):
    for path in files:
        yield from read_records(path)


def encode_jsonl(files, tmpl: dict, is_val: np.ndarray, tokenizer: Tokenizer, folder: Path, dtype):
    """Pass 2: every record into <split>.bin and its flags into <split>_mask.bin. The boundary
    token that closes a record is in the loss when the record's last part is (a response's
    end); the first boundary of a split never is. Returns the token count and the count in
    the loss of each split, and each record's token count."""
    n_tokens, n_loss = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    closing = {"train": 0, "val": 0}  # the flag of the boundary that closes the split's last record
    lengths = np.zeros(len(is_val), dtype=np.int64)
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    with open(folder / "train.bin", "wb") as train_ids, open(folder / "val.bin", "wb") as val_ids, \
            open(folder / MASK_OUTPUTS[0], "wb") as train_mask, open(folder / MASK_OUTPUTS[1], "wb") as val_mask:
        outs = {"train": (train_ids, train_mask), "val": (val_ids, val_mask)}

        def write(split, ids, mask):
            outs[split][0].write(ids.astype(dtype, copy=False).tobytes())
            outs[split][1].write(mask.tobytes())
            n_tokens[split] += len(ids)
            n_loss[split] += int(mask.sum())

        for i, (record, kind) in enumerate(tqdm(iter_records(files), total=len(is_val), unit="rec",
                                                desc="encode", disable=None)):
            split = "val" if is_val[i] else "train"
            parts = template.record_parts(record, kind, tmpl)
            ids, mask = template.encode_parts(tokenizer, parts)
            write(split, eot, np.array([closing[split]], dtype=np.uint8))
            write(split, ids, mask)
            closing[split] = int(parts[-1][1])
            lengths[i] = len(ids)
        for split in outs:
            write(split, eot, np.array([closing[split]], dtype=np.uint8))
    return n_tokens, n_loss, lengths


def prepare_jsonl(args, files: list[Path], tokenizer: Tokenizer | None, bpe_size: int | None,
                  folder: Path, source: str | None = None) -> dict:
    """Instruction data into folder: train/val bins, their masks; returns meta.json's dict.
    tokenizer: the tiktoken encoding asked for, or the vocabulary of --tokenizer=source, or None
    for char and a trained vocabulary."""
    if args.documents != "file":
        raise UserError("JSONL input: every record is one document already; drop --documents (or pass "
                        "--format=text to read the file as plain text, a JSON log, say)")
    tmpl = read_template(args.template)
    sources, kinds, chars = scan_jsonl(files, tmpl)
    n_records = sum(kinds.values())
    if n_records == 0:
        raise UserError(f"the input has no records: {', '.join(str(p) for p in files)}")
    is_val = choose_val_documents(n_records, args.val_fraction, args.shuffle.lower() == "true", args.seed)
    print(f"{n_records:,} records ({', '.join(f'{n:,} {k}' for k, n in kinds.items() if n)}): "
          f"{n_records - int(is_val.sum()):,} train, {int(is_val.sum()):,} val")
    if bpe_size:
        texts = ("".join(t for t, _ in template.record_parts(r, k, tmpl))
                 for (r, k), v in zip(iter_records(files), is_val) if not v)
        say_bpe_training(bpe_size, args.bpe_sample_chars)
        tokenizer = train_bpe(bounded(texts, args.bpe_sample_chars), bpe_size, JSONL)
    elif tokenizer is None:
        tokenizer = Tokenizer.char_from_text(chars, JSONL)
    elif source:
        check_vocabulary(tokenizer, source, chars, JSONL)
    tokenizer.documents = JSONL
    say_vocab_size(tokenizer, source)
    dtype = np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<u4")
    n_tokens, n_loss, lengths = encode_jsonl(files, tmpl, is_val, tokenizer, folder, dtype)
    need = args.block_size + 1
    for split in ("train", "val"):
        print(f"{split} has {n_tokens[split]:,} tokens, {n_loss[split]:,} of them in the loss")
        if n_tokens[split] < need:
            raise UserError(f"the {split} split has {n_tokens[split]:,} tokens, fewer than block_size + 1 = "
                            f"{need} (one training window); add records, change --val_fraction, "
                            "or use a smaller --block_size")
    stats = document_stats(lengths, args.block_size)
    instruct = kinds["prompt_response"] > 0 or kinds["messages"] > 0  # else documents of text, as --documents
    if stats["longer_than_block_size"] > LONG_DOCUMENTS_WARNING * n_records:
        print(f"warning: {stats['longer_than_block_size']:,} of {n_records:,} records are longer than "
              f"--block_size={args.block_size} tokens; train.py cuts them into windows, so "
              + ("the end of an answer may be learned without its question" if instruct else
                 "a window may start inside a record")
              + ": train with a larger --block_size if you can", file=sys.stderr)
    return {"version": FORMAT_VERSION, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name, "train_tokens": n_tokens["train"], "val_tokens": n_tokens["val"],
            "eot_id": tokenizer.eot_id, **({"chars": tokenizer.chars} if tokenizer.chars is not None else {}),
            "documents": JSONL, "train_documents": n_records - int(is_val.sum()),
            "val_documents": int(is_val.sum()), "shuffle": args.shuffle.lower() == "true", "seed": args.seed,
            "document_tokens": stats,
            "loss_mask": {"train": MASK_OUTPUTS[0], "val": MASK_OUTPUTS[1], "dtype": "uint8",
                          "train_loss_tokens": n_loss["train"], "val_loss_tokens": n_loss["val"]},
            "records": kinds, **({"template": tmpl, "chat": kinds["messages"] > 0} if instruct else {}),
            **({"bpe": tokenizer.describe()["bpe"]} if tokenizer.name == BPE else {}),
            "sources": sources}


# ---------------------------------------------------------------- main

class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a mistake is one `error:` line (see errors.py), not usage + error."""

    def error(self, message):
        raise UserError(f"{message}; see python prepare.py --help")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except None: an option without one says in its own words
    what happens when it is left out ("default: the named dataset")."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv):
    p = ArgumentParser(
        description="Prepare a text dataset: raw UTF-8 text -> data/<name>/{train.bin,val.bin,meta.json}.",
        formatter_class=HelpFormatter)
    p.add_argument("dataset", nargs="?", help=f"a named dataset: {', '.join(NAMED_DATASETS)}")
    p.add_argument("--input", nargs="+", action="extend", metavar="PATH", type=os.path.expanduser,
                   help="UTF-8 text files or folders of them (each file is one document; read as text: "
                        "CRLF and CR line ends become LF, a leading byte-order mark is dropped)")
    p.add_argument("--name", help="dataset name: output goes to <data_dir>/<name>/ (default: the named dataset)")
    p.add_argument("--tokenizer", help="'char', a tiktoken encoding: gpt2 (default), r50k_base, "
                                       "cl100k_base, o200k_base, bpe:N to train a byte-level BPE "
                                       "vocabulary of N tokens on the training text, or the folder of a "
                                       "prepared dataset (data/NAME) or of a run (its --out_dir) to use "
                                       "its vocabulary: more text for a char-level or bpe:N model")
    p.add_argument("--documents", default="file",
                   help="what one document is: file (each input file), line (every non-blank line) or "
                        "blank (text between blank lines); line and blank start every document with a "
                        "boundary token, split val by whole documents and make train.py train in "
                        "document mode")
    p.add_argument("--shuffle", default="true",
                   help="documents mode: val takes the last --val_fraction of the documents after a "
                        "seeded shuffle (true) or in input order (false)")
    p.add_argument("--seed", type=int, default=1337, help="documents mode: seed of the val shuffle")
    p.add_argument("--format", default="auto", choices=("auto", "text", JSONL),
                   help="auto: inputs ending in .jsonl are instruction records (text, prompt/response or "
                        "messages: see docs/finetune.md), others plain text")
    p.add_argument("--template", metavar="FILE.json",
                   help="JSONL: the template joining prompts, answers and chat turns (keys system, user, "
                        "assistant, end; default: template.TEMPLATE)")
    p.add_argument("--bpe_sample_chars", type=int, default=10_000_000,
                   help="--tokenizer=bpe:N trains on at most this many characters of the training text")
    p.add_argument("--val_fraction", type=float, default=0.1, help="last fraction of the tokens used as val")
    p.add_argument("--block_size", type=int, default=256,
                   help="each split must hold at least block_size + 1 tokens (one training window)")
    p.add_argument("--data_dir", default="data", type=os.path.expanduser, help="root folder of prepared datasets")
    p.add_argument("--chunk_size", type=int, default=1 << 20,
                   help="characters per encode call (also bytes per read)")
    p.add_argument("--num_workers", type=int, default=min(os.cpu_count() or 1, MAX_WORKERS or 1 << 20),
                   help=f"encoder processes (at most {MAX_WORKERS} on Windows)" if sys.platform == "win32"
                   else "encoder processes")
    return p.parse_args(argv)


def check_args(args) -> tuple[str, str | None]:
    """Every mistake in the flags, before any work. Returns the dataset's name and its documents
    mode (None: the text is one stream, not documents)."""
    if args.dataset is not None and args.dataset not in NAMED_DATASETS:
        raise UserError(f"unknown dataset {args.dataset!r}; named datasets: {', '.join(NAMED_DATASETS)} "
                        "(or pass --input PATH --name NAME)")
    if args.dataset is None and not args.input:
        raise UserError(f"nothing to prepare: name a dataset ({', '.join(NAMED_DATASETS)}) "
                        "or pass --input PATH [PATH ...] --name NAME")
    name = args.name or args.dataset
    if not name:
        raise UserError("pass --name NAME to say where the dataset goes (data/NAME/)")
    if name.startswith(".") or "/" in name or os.sep in name:
        raise UserError(f"--name {name!r} must be a plain folder name (no '/', not starting with '.')")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.chunk_size < 1 or args.num_workers < 1 or args.block_size < 1 or args.bpe_sample_chars < 1:
        raise UserError("--chunk_size, --num_workers, --block_size and --bpe_sample_chars must be positive")
    if MAX_WORKERS and args.num_workers > MAX_WORKERS:
        raise UserError(f"--num_workers={args.num_workers}: Python's process pools take at most {MAX_WORKERS} "
                        f"workers on Windows; pass --num_workers={MAX_WORKERS} or fewer")
    if args.documents not in DOCUMENT_MODES:
        raise UserError(f"unknown --documents mode {args.documents!r}; valid: {', '.join(DOCUMENT_MODES)}")
    if args.shuffle.lower() not in ("true", "false"):
        raise UserError(f"--shuffle must be true or false, got {args.shuffle!r}")
    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    default = NAMED_DATASETS.get(args.dataset)
    if default and args.tokenizer and args.tokenizer != default and not args.name:
        raise UserError(f"{args.dataset} is the {default} tokenization of its text (the recipes expect it); "
                        f"for --tokenizer={args.tokenizer} give the dataset a name of its own, e.g. "
                        f"--name {args.dataset}_{args.tokenizer.replace(':', '')}")
    return name, None if args.documents == "file" else args.documents


def make_temp_folder(data_dir: Path, name: str) -> Path:
    """A fresh folder beside data/<name>/ to build the dataset in (swap_into_place moves it there),
    after removing the ones runs that died left behind."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(data_dir, name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=data_dir))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset is not
    except OSError as e:
        raise UserError(f"cannot write to {data_dir}: {e.strerror or e}; pick another --data_dir") from None
    return tmp


def encode_splits(args, files: list[Path], documents: str | None, is_val, n_docs: int, tokenizer: Tokenizer,
                  tmp: Path, dtype) -> tuple[int, int, dict]:
    """Encode the input into tmp/train.bin (and val.bin in documents mode). Returns the token
    counts of train and val, and what meta.json says of the documents (empty without them)."""
    if not documents:
        n_tokens = encode_files(files, tokenizer, tmp / "train.bin", dtype, args.chunk_size, args.num_workers)
        n_train = int(n_tokens * (1 - args.val_fraction))  # nanoGPT: data[:int(n*0.9)]
        return n_train, n_tokens - n_train, {}
    n_split, lengths = encode_documents(files, documents, is_val, tokenizer, tmp, dtype,
                                        args.chunk_size, args.num_workers)
    stats = document_stats(lengths, args.block_size)
    doc_meta = {"documents": documents, "train_documents": n_docs - int(is_val.sum()),
                "val_documents": int(is_val.sum()), "shuffle": args.shuffle.lower() == "true",
                "seed": args.seed, "document_tokens": stats}
    print(f"document length in tokens: mean {stats['mean']:.1f}, median {stats['median']:.0f}, "
          f"max {stats['max']:,}")
    if stats["longer_than_block_size"] > LONG_DOCUMENTS_WARNING * n_docs:
        print(f"warning: {stats['longer_than_block_size']:,} of {n_docs:,} documents are longer than "
              f"--block_size={args.block_size} tokens (with their boundary); train.py cuts them into "
              f"windows, so train with a larger --block_size if you can", file=sys.stderr)
    return n_split["train"], n_split["val"], doc_meta


def main(argv=None):
    restore_sigterm = errors.terminate_cleanly()  # SIGTERM: the temporary folder removed, `terminated`
    try:
        with errors.stdout_may_close("prepare.py goes on, its lines dropped"):
            prepare(argv)
    finally:
        restore_sigterm()


def prepare(argv=None):
    args = parse_args(argv)
    name, documents = check_args(args)
    tokenizer_name = args.tokenizer or NAMED_DATASETS.get(args.dataset, "gpt2")
    source = tokenizer_name if names_a_vocabulary(tokenizer_name) else None  # another dataset's or run's
    bpe_size = None if source else parse_bpe_size(tokenizer_name)
    if not source and not bpe_size and tokenizer_name not in (CHAR, *tiktoken.list_encoding_names()) and \
            (Path(args.data_dir) / tokenizer_name / "meta.json").is_file():  # a dataset's name: its vocabulary?
        raise UserError(f"unknown tokenizer {tokenizer_name!r}; for the vocabulary of the dataset of that name, "
                        f"pass its folder: --tokenizer={quoted(Path(args.data_dir) / tokenizer_name)}")
    tokenizer = (vocabulary_of(source) if source else
                 None if tokenizer_name == CHAR or bpe_size else Tokenizer.tiktoken(tokenizer_name))
    if tokenizer is not None and not source:
        tokenizer.documents = documents

    data_dir = Path(args.data_dir)
    dest = data_dir / name
    replaced = " (replacing the dataset prepared there before)" if (dest / "meta.json").exists() else ""
    created = not data_dir.exists()  # a run that fails leaves no empty --data_dir of its own behind
    tmp = make_temp_folder(data_dir, name)

    # one prepare per dataset: held beside data/<name>/, which the swap below replaces whole
    lock = runlock.FolderLock(data_dir / f".{name}.lock", f"dataset folder {dest}", "choose another --name")
    try:
        lock.acquire()
        if args.input:
            files = list_files(args.input)
        elif (dest / "input.txt").is_file():
            files = [dest / "input.txt"]
        else:
            download_shakespeare(tmp / "input.txt", dest / "input.txt")  # kept in data/<name>/ after the swap
            files = [tmp / "input.txt"]
        if is_jsonl(files, args.format):  # instruction data: its own path (the JSONL block above)
            meta = prepare_jsonl(args, files, tokenizer, bpe_size, tmp, source)
            write_dataset(tmp, dest, meta)
            print(f"wrote {dest}/{replaced}: train.bin, val.bin ({meta['dtype']}), their loss masks "
                  f"({', '.join(MASK_OUTPUTS)}), meta.json")
            return
        if path := json_read_as_text(files, args.format):
            print(f"note: {path} is read as plain text, its JSON syntax and keys included (--format=text says so "
                  f"and drops this note); instruction records are JSONL, one object per line with prompt and "
                  f"response (or text, or messages): e.g. `jq -c '.[]' {quoted(path)} > records.jsonl`, then "
                  f"rename the keys")
        if args.template:
            raise UserError(f"--template joins the records of JSONL instruction data; {files[0]} is plain "
                            f"text: drop --template, or pass a .jsonl file (--format=jsonl)")
        char_vocabulary = tokenizer_name == CHAR or (tokenizer is not None and tokenizer.chars is not None)
        sources, n_chars, chars = scan(files, args.chunk_size, want_chars=char_vocabulary, documents=args.documents)
        if source:
            check_vocabulary(tokenizer, source, chars, documents)
        n_docs = sum(s.get("documents", 0) for s in sources)
        if documents and n_docs == 0:
            what = "non-empty line" if documents == "line" else "document (text between blank lines)"
            raise UserError(f"the input has no {what}: {', '.join(str(p) for p in files)}")
        if n_chars == 0:
            raise UserError(f"the input is empty: {', '.join(str(p) for p in files)}")
        if files == [tmp / "input.txt"]:
            sources[0]["path"] = str(dest / "input.txt")
        elif files == [dest / "input.txt"] and args.dataset and sources[0]["sha256"] != SHAKESPEARE_SHA256:
            # a file put there, or left by an earlier --input: what this run reads, not the corpus
            print(f"note: {dest / 'input.txt'} is not tiny Shakespeare as downloaded (another sha256); the "
                  f"dataset is built from it: delete it to download the corpus, or pass --input PATH")
        print(f"length of dataset in characters: {n_chars:,}")
        is_val = None
        if documents:
            is_val = choose_val_documents(n_docs, args.val_fraction, args.shuffle.lower() == "true", args.seed)
            print(f"{n_docs:,} documents ({documents} mode): {n_docs - int(is_val.sum()):,} train, "
                  f"{int(is_val.sum()):,} val")
        if bpe_size:
            if documents:  # the training documents only
                texts = (doc for doc, v in zip(iter_documents(files, documents, args.chunk_size), is_val) if not v)
            else:  # the text without its tail, which becomes val
                texts = (piece for path in files for piece in chunk_text(read_text(path, args.chunk_size), args.chunk_size))
                texts = bounded(texts, int(n_chars * (1 - args.val_fraction)))
            sample = min(args.bpe_sample_chars, n_chars)
            say_bpe_training(bpe_size, sample)
            tokenizer = train_bpe(bounded(texts, args.bpe_sample_chars), bpe_size, documents)
        if tokenizer is None:
            tokenizer = Tokenizer.char_from_text(chars, documents)
            # as nanoGPT prints them (its newline too), other control characters escaped: a NUL
            # or an escape sequence would reach the terminal itself
            shown = "".join(c if c.isprintable() or c == "\n" else ascii(c)[1:-1] for c in tokenizer.chars)
            print("all the unique characters:", shown if len(shown) <= 500 else shown[:500] + "...")
        say_vocab_size(tokenizer, source)

        dtype = np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<u4")
        n_train, n_val, doc_meta = encode_splits(args, files, documents, is_val, n_docs, tokenizer, tmp, dtype)
        n_tokens = n_train + n_val
        need = args.block_size + 1  # one training window: block_size inputs + the next token
        if n_tokens < 2 * need:
            raise UserError(f"the input has only {n_tokens:,} tokens, but train and val each need at "
                            f"least block_size + 1 = {need}; use more text or a smaller --block_size")
        for split, n, fix in (("train", n_train, "a smaller"), ("val", n_val, "a larger")):
            if n < need:
                raise UserError(f"the {split} split has {n:,} tokens, fewer than block_size + 1 = {need} "
                                f"(one training window); use {fix} --val_fraction, more text, "
                                "or a smaller --block_size")
        if not documents:
            split_tail(tmp / "train.bin", n_train, tmp / "val.bin", dtype.itemsize)
        print(f"train has {n_train:,} tokens")
        print(f"val has {n_val:,} tokens")
        if bpe_size and tokenizer.vocab_size > n_train // 10:
            print(f"note: a vocabulary of {tokenizer.vocab_size:,} tokens for {n_train:,} training tokens: most "
                  f"tokens occur a few times or never, too few for a model to learn them; a smaller bpe:N (a "
                  f"tenth of the training tokens or less) learns more from this text", file=sys.stderr)

        meta = {
            "version": FORMAT_VERSION,
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "eot_id": tokenizer.eot_id,
            **({"chars": tokenizer.chars} if tokenizer.chars is not None else {}),
            **doc_meta,
            **({"bpe": tokenizer.describe()["bpe"]} if tokenizer.name == BPE else {}),
            "sources": sources,
        }
        write_dataset(tmp, dest, meta)
    except OSError as e:
        raise UserError(f"cannot write the dataset to {dest}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
        lock.release()
        if created:
            try:
                data_dir.rmdir()  # only if empty: a failed run's
            except OSError:
                pass
    print(f"wrote {dest}/{replaced}: train.bin, val.bin ({dtype.name}), meta.json")


if __name__ == "__main__":
    run_main(main)
