"""Checkpoint I/O: atomic writes and safe reads of <out_dir>/ckpt.pt.

A checkpoint is one dict of plain data (tensors, numbers, strings, lists, dicts) that
`torch.load(path, weights_only=True)` opens without running any code from the file:

    format, version        "nanogpt-ckpt", 1
    model                  state_dict of the uncompiled module (no `_orig_mod.` prefix)
    model_args             GPTConfig fields
    optimizer, scaler      optimizer and GradScaler state
    iter_num, best_val_loss
    train_seconds          training time spent so far (train.py --time_budget counts it)
    holds_best, best_iter  saved at an improving evaluation; where the best val loss was measured
    eval_owed              a stop dropped the evaluation due at iter_num: the resumed run makes it
    config                 the full resolved training config
    tokenizer              Tokenizer.describe(), so sample.py needs nothing from data/
    rng                    torch (and cuda) RNG states, and per rank the data sampler's
                           generator ("data") and torch RNG ("torch_ranks", for dropout)
    precision              the device and dtype it was trained in (a resume may change them)

It is written to a temporary file in the same folder, flushed, fsync'd and renamed over
the old one (durable.py: the folder is fsync'd too where the OS allows it), so a crash or a
full disk at any moment leaves the previous checkpoint intact, on Linux, macOS and Windows.
On load, every part of the file (torch.save writes a zip) is checked against the CRC-32 the
zip recorded, so bytes changed on disk are refused rather than read as weights.
"""
import math
import os
import pickle
import threading
import warnings
import zipfile
from pathlib import Path

import torch

import durable
from errors import UserError

FORMAT = "nanogpt-ckpt"
VERSION = 1
REQUIRED = ("model", "model_args", "iter_num", "config", "tokenizer")


def save(checkpoint: dict, path) -> None:
    """Write checkpoint to path atomically; on failure the previous file is untouched."""
    path = Path(path)
    checkpoint = {"format": FORMAT, "version": VERSION, **checkpoint}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with durable.replacing(path) as f:
            torch.save(checkpoint, f)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        if isinstance(e, OSError) and e.strerror:
            reason = e.strerror
        else:  # torch's own words ("[enforce fail at inline_container.cc...] unexpected pos ...") say little
            reason = f"the write stopped short ({(str(e).splitlines() or [''])[0][:200]})"
        kept = " The previous checkpoint is unchanged." if path.exists() else ""
        raise UserError(f"could not write checkpoint {path}: {reason}. Free some disk space or "
                        f"choose another --out_dir.{kept}") from None


def load(path, map_location="cpu") -> dict:
    """Read a checkpoint written by save(); refuse anything else with a clear message."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.exists():
        raise UserError(f"no checkpoint at {path}; train one with `python train.py ...` "
                        f"or point --out_dir at the folder that holds ckpt.pt")
    loaded, checked = open_twice(path)
    with loaded, checked:
        check = ChecksumCheck(checked)  # on another core, while torch reads the other handle
        try:
            checkpoint = read(loaded, path, map_location)
        except BaseException:  # a refusal, Ctrl-C: the check stops at its next chunk, nobody waits for it
            check.cancel()
            raise
        if name := check.result():
            raise UserError(f"{path} is corrupted: its part {name} fails its checksum (its bytes changed after "
                            f"it was written); restore it or train again")
    if isinstance(checkpoint, dict) and "format" not in checkpoint and {"model", "model_args", "config"} <= checkpoint.keys():
        raise UserError(f"{path} is a checkpoint of nanoGPT itself, which this project does not read; train the "
                        f"model again here with the same settings (python train.py configs/shakespeare.py is "
                        f"nanoGPT's train_shakespeare_char.py; docs/configs.md has the others)")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (no '{FORMAT}' format tag); "
                        f"it was written by another program")
    if checkpoint.get("version", 0) > VERSION:
        raise UserError(f"{path} has checkpoint version {checkpoint['version']}, newer than this "
                        f"code reads ({VERSION}); update the code")
    missing = [k for k in REQUIRED if k not in checkpoint]
    if missing:
        raise UserError(f"{path} is missing {', '.join(missing)}; it is incomplete or from another program")
    return checkpoint


def open_twice(path: Path):
    """Two handles on one file (a save may replace path between two opens: then again)."""
    for _ in range(3):
        try:
            a, b = open(path, "rb"), open(path, "rb")
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        if os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno())):
            return a, b
        a.close()
        b.close()
    raise UserError(f"{path} keeps being replaced as it is read (a run saving every step?); try again")


def read(f, path: Path, map_location):
    """torch.load of untrusted bytes, as plain data only: any failure is one line."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols; we refuse them below
            warnings.simplefilter("ignore")
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "global" in str(e):  # a class or function the safe loader will not call
            raise UserError(f"{path} holds pickled objects that are not plain data; refusing to load "
                            f"it (nothing in it was run). Only load checkpoints you trust, "
                            f"written by train.py") from None
        raise UserError(f"{path} is truncated or corrupted (not a readable checkpoint); restore it or "
                        f"train again") from None
    except Exception as e:  # noqa: BLE001 (untrusted bytes: IndexError, KeyError, struct.error, ...)
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""  # torch's first sentence, not its advice
        detail = (first if len(first) > 12 else  # a bare "101" (a KeyError's) says nothing: its kind too
                  f"{type(e).__name__}: {first}" if first else type(e).__name__)
        raise UserError(f"{path} is truncated or corrupted (not a readable checkpoint: {detail}); restore "
                        f"it or train again") from None


class ChecksumCheck:
    """The first part of a checkpoint (torch.save writes a zip) whose bytes fail the CRC-32 the
    zip recorded when it was written: a bit flipped on disk, or an edit, which torch.load itself
    reads without a word (a NaN in the weights, say). Runs in a daemon thread, 1 MiB at a time,
    so that cancel() ends it at once and an exit never waits for it. result(): the part's name,
    or None when every part passes, for a file that is no zip (torch.load judges it), and for
    parts written without a CRC (torch's save option compute_crc32=False records 0)."""

    def __init__(self, f):
        self.stop, self.damaged = threading.Event(), None
        self.thread = threading.Thread(target=self._run, args=(f,), daemon=True)
        self.thread.start()

    def _run(self, f):
        try:
            z = zipfile.ZipFile(f)
        except Exception:  # noqa: BLE001 (no zip, or no readable directory: torch.load's to judge)
            return
        for info in z.infolist():
            if info.CRC == 0 or info.is_dir():
                continue
            try:
                with z.open(info) as part:
                    while part.read(1 << 20):
                        if self.stop.is_set():
                            return
            except Exception:  # noqa: BLE001 (a CRC mismatch, a damaged header, zlib's error)
                if not self.stop.is_set():
                    self.damaged = info.filename
                return

    def cancel(self):
        self.stop.set()

    def result(self) -> str | None:
        self.thread.join()
        return self.damaged


def val_loss_text(record: dict) -> str | None:
    """What a model card says of the val loss of the model a checkpoint holds (record: the
    checkpoint, or an export's record of its run): the run's best where this is the best model;
    else its own, where it was evaluated, and the run's best beside it (always_save_checkpoint
    keeps the last model, a finetune can get worse). None where nothing was measured."""
    best, own, at = record.get("best_val_loss"), record.get("val_loss"), record.get("best_iter")
    if not isinstance(best, (int, float)) or not math.isfinite(best):
        return None
    if record.get("holds_best", True) or own == best:  # (older checkpoints: the best, as they said)
        return f"{best:.4f}"
    run_best = f"the run's best was {best:.4f}" + (f", at iteration {at:,}" if isinstance(at, int) else "") + (
        ": the model this run started from" if at == 0 else "")
    return (f"{own:.4f} (this model's; {run_best})" if isinstance(own, (int, float)) and math.isfinite(own)
            else f"this model's not recorded ({run_best})")

