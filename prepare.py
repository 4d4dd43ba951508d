"""Prepare a dataset: raw UTF-8 text -> data/<name>/train.bin, val.bin, meta.json.

    python prepare.py shakespeare_char                  # tiny Shakespeare, char-level
    python prepare.py shakespeare                       # tiny Shakespeare, GPT-2 BPE
    python prepare.py --input books/ --name books --tokenizer cl100k_base

train.bin and val.bin are flat little-endian token ids (uint16, or uint32 when the
vocabulary does not fit in 16 bits); the last --val_fraction of the token stream is val,
as in nanoGPT. meta.json describes the tokenizer, the dtype, the split sizes and the
sources (see DESIGN.md, contract 1).

Several input files are separate documents. With BPE they are joined by the end-of-text
token; char-level has no such token, so their texts are simply concatenated. Either way
decoding train.bin followed by val.bin gives the documents back exactly: joined by
"<|endoftext|>" (BPE) or by nothing (char).

Inputs of any size stream with bounded memory in two passes: pass 1 checks the UTF-8,
hashes each file and collects the characters; pass 2 encodes chunks of text on all cores
in worker processes and appends the ids to one stream, which is then split by
moving its tail into val.bin. Everything is written into a hidden temporary folder that
is swapped into place at the end, so an interrupted run leaves the previous dataset.
"""
import argparse
import codecs
import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.request
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

import runlock
from errors import UserError, run_main
from tokenizer import CHAR, Tokenizer

FORMAT_VERSION = 1
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
NAMED_DATASETS = {"shakespeare_char": CHAR, "shakespeare": "gpt2"}  # name -> default tokenizer
OUTPUTS = ("train.bin", "val.bin", "meta.json")  # what a run writes into data/<name>/


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
    """The files named, and the files under the folders named (recursively, sorted, no hidden)."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise UserError(f"no files found in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input not found: {path}")
    return files


def read_text(path: Path, read_size: int, progress=None, sha=None):
    """Yield the text of a UTF-8 file piece by piece (an incremental decoder keeps
    characters whole across reads); non-UTF-8 bytes raise UserError with their offset.
    Updates the tqdm bar `progress` and the hash `sha` with the bytes read."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes handed to the decoder so far
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(read_size)
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the last read
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    raise UserError(f"{path} is not UTF-8 text: invalid byte at offset "
                                    f"{offset - pending + e.start}") from None
                offset += len(data)
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


def scan(files: list[Path], read_size: int, want_chars: bool) -> tuple[list[dict], int, set]:
    """Pass 1: size and sha256 of each file, UTF-8 check, character count and set."""
    sources, n_chars, chars = [], 0, set()
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="scan", disable=None) as bar:
        for path in files:
            sha = hashlib.sha256()
            for text in read_text(path, read_size, bar, sha):
                n_chars += len(text)
                if want_chars:
                    chars.update(text)
            sources.append({"path": str(path), "bytes": path.stat().st_size, "sha256": sha.hexdigest()})
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


# ---------------------------------------------------------------- encoding and writing

_worker_tokenizer = None  # each encoder process builds its own tokenizer once


def _start_worker(description: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_description(description)


def _encode_chunk(text: str) -> np.ndarray:
    return _worker_tokenizer.encode_to_numpy(text)


def encode_files(files, tokenizer: Tokenizer, out_path: Path, dtype, chunk_size: int,
                 num_workers: int) -> int:
    """Pass 2: encode every file, documents joined by end-of-text (BPE), into one flat
    stream of ids at out_path. Returns the number of tokens written."""
    eot = None if tokenizer.eot_id is None else np.array([tokenizer.eot_id], dtype=dtype)
    total = sum(p.stat().st_size for p in files)
    n_tokens = 0
    # A bounded queue of encodes in flight: worker processes encode while this one reads,
    # cuts and writes, and memory holds a few chunks, never the whole input. Processes, not
    # threads: tiktoken's threads contend with each other (measured 6.7 MB/s with two
    # threads, 11.6 MB/s with two processes on 2 cores).
    pending: deque = deque()
    with open(out_path, "wb") as out, ProcessPoolExecutor(
            num_workers, initializer=_start_worker, initargs=(tokenizer.describe(),)) as pool, \
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
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def carry_over(old: Path, new: Path) -> None:
    """Keep what the user had in data/<name>/ besides our outputs (input.txt, say): hard
    links where possible, copies otherwise."""
    for entry in old.iterdir():
        if entry.name in OUTPUTS or (new / entry.name).exists():
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
        os.rename(dest, old / dest.name)
    try:
        os.rename(tmp, dest)
    except OSError:
        if old is not None:
            os.rename(old / dest.name, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(data_dir: Path, name: str) -> None:
    """Delete hidden temp folders that killed runs of this dataset left behind."""
    for p in data_dir.glob(f".{name}.*"):
        m = re.match(rf"\.{re.escape(name)}\.(?:tmp|old)-(\d+)-", p.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)  # the run that made it is still going: leave it
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


# ---------------------------------------------------------------- main

class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a mistake is one `error:` line (see errors.py), not usage + error."""

    def error(self, message):
        raise UserError(f"{message}; see python prepare.py --help")


def parse_args(argv):
    p = ArgumentParser(
        description="Prepare a text dataset: raw UTF-8 text -> data/<name>/{train.bin,val.bin,meta.json}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset", nargs="?", help=f"a named dataset: {', '.join(NAMED_DATASETS)}")
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="UTF-8 text files or folders of them (each file is one document)")
    p.add_argument("--name", help="dataset name: output goes to <data_dir>/<name>/ (default: the named dataset)")
    p.add_argument("--tokenizer", help="'char' or a tiktoken encoding: gpt2 (default), r50k_base, "
                                       "cl100k_base, o200k_base")
    p.add_argument("--val_fraction", type=float, default=0.1, help="last fraction of the tokens used as val")
    p.add_argument("--block_size", type=int, default=256,
                   help="each split must hold at least block_size + 1 tokens (one training window)")
    p.add_argument("--data_dir", default="data", help="root folder of prepared datasets")
    p.add_argument("--chunk_size", type=int, default=1 << 20,
                   help="characters per encode call (also bytes per read)")
    p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="encoder processes")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
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
    if args.chunk_size < 1 or args.num_workers < 1 or args.block_size < 1:
        raise UserError("--chunk_size, --num_workers and --block_size must be positive")

    tokenizer_name = args.tokenizer or NAMED_DATASETS.get(args.dataset, "gpt2")
    tokenizer = None if tokenizer_name == CHAR else Tokenizer.tiktoken(tokenizer_name)

    data_dir = Path(args.data_dir)
    dest = data_dir / name
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(data_dir, name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=data_dir))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset is not
    except OSError as e:
        raise UserError(f"cannot write to {data_dir}: {e.strerror or e}; pick another --data_dir") from None

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
        sources, n_chars, chars = scan(files, args.chunk_size, want_chars=tokenizer is None)
        if n_chars == 0:
            raise UserError(f"the input is empty: {', '.join(str(p) for p in files)}")
        if files == [tmp / "input.txt"]:
            sources[0]["path"] = str(dest / "input.txt")
        print(f"length of dataset in characters: {n_chars:,}")
        if tokenizer is None:
            tokenizer = Tokenizer.char_from_text(chars)
            shown = "".join(tokenizer.chars)
            print("all the unique characters:", shown if len(shown) <= 500 else shown[:500] + "...")
        print(f"vocab size: {tokenizer.vocab_size:,} ({tokenizer.name})")

        dtype = np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<u4")
        n_tokens = encode_files(files, tokenizer, tmp / "train.bin", dtype, args.chunk_size, args.num_workers)
        n_train = int(n_tokens * (1 - args.val_fraction))  # nanoGPT: data[:int(n*0.9)]
        n_val = n_tokens - n_train
        need = args.block_size + 1  # one training window: block_size inputs + the next token
        if n_tokens < 2 * need:
            raise UserError(f"the input has only {n_tokens:,} tokens, but train and val each need at "
                            f"least block_size + 1 = {need}; use more text or a smaller --block_size")
        for split, n, fix in (("train", n_train, "a smaller"), ("val", n_val, "a larger")):
            if n < need:
                raise UserError(f"the {split} split has {n:,} tokens, fewer than block_size + 1 = {need} "
                                f"(one training window); use {fix} --val_fraction, more text, "
                                "or a smaller --block_size")
        split_tail(tmp / "train.bin", n_train, tmp / "val.bin", dtype.itemsize)
        print(f"train has {n_train:,} tokens")
        print(f"val has {n_val:,} tokens")

        meta = {
            "version": FORMAT_VERSION,
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "eot_id": tokenizer.eot_id,
            **({"chars": tokenizer.chars} if tokenizer.chars is not None else {}),
            "sources": sources,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        fsync_dir_files(tmp)
        if dest.is_dir():
            carry_over(dest, tmp)
        swap_into_place(tmp, dest)
    except OSError as e:
        raise UserError(f"cannot write the dataset to {dest}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
        lock.release()
    print(f"wrote {dest}/: train.bin, val.bin ({dtype.name}), meta.json")


if __name__ == "__main__":
    run_main(main)
