"""The prepared token bins of data/<name>/ (prepare.py writes them), read as training batches.

A dataset prepared with --documents=line|blank is read in document mode: every row of a batch
starts at a document's boundary token and runs on through the documents after it until the
row is full (short documents packed one after another; the last one is cut at the row's end),
and a third tensor gives each token's position in its document, so that position embeddings
restart at each document and attention never crosses a boundary (model.document_mask). A
document longer than block_size is also read from windows that start every block_size tokens
inside it, their positions counted from 0 as in generation's sliding window
(model.GPT.generate_stream), so no part of it is left out. Rows whose window would run past
the split's end are never drawn.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from errors import UserError, quoted
from tokenizer import DOCUMENT_MODES, NAMED_DATASETS

HERE = Path(__file__).resolve().parent


class Dataset:
    """The token bins of data/<name>/, read as memory maps.

    Each batch opens a fresh np.memmap: keeping one open lets its pages pile up in the
    process (the leak nanoGPT works around the same way). The memmaps are made from files held
    open since the dataset was opened, not from their names: a prepare.py that replaces the
    dataset while a run trains on it (its new folder swapped in) leaves this run reading the
    data it started with, never a mix of the two."""

    def __init__(self, data_dir: str, name: str):
        folder = Path(data_dir) / name
        meta_path = folder / "meta.json"
        if not name.strip():
            raise UserError("--dataset is empty: name a prepared dataset (a folder of data/), e.g. --dataset=shakespeare_char")
        if not meta_path.exists():
            beside = HERE / data_dir / name / "meta.json"  # a run started from another folder
            if not Path(data_dir).is_absolute() and beside.is_file() and beside.resolve() != meta_path.resolve():
                raise UserError(f"dataset {name!r} not found in {meta_path.parent.resolve()} (--data_dir is read from "
                                f"the current folder, {Path.cwd()}); it is in {beside.parent}: pass "
                                f"--data_dir={quoted(HERE / data_dir)} or run from {quoted(HERE)}")
            where = "" if Path(data_dir) == Path("data") else f" --data_dir {quoted(data_dir)}"
            named = f"`python prepare.py {name}{where}` or " if name in NAMED_DATASETS else ""
            raise UserError(f"dataset {name!r} not found ({meta_path} is missing); run "
                            f"{named}`python prepare.py --input FILE --name {quoted(name)}{where}` first")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
            self.dtype = np.dtype(self.meta["dtype"])
            self.vocab_size = int(self.meta["vocab_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{meta_path} is not a valid meta.json ({e}); run prepare.py again") from None
        self.paths = {split: folder / f"{split}.bin" for split in ("train", "val")}
        self.sizes = {}
        for split, path in self.paths.items():
            if not path.exists():
                raise UserError(f"{path} is missing; run prepare.py for {name!r} again")
            n = path.stat().st_size // self.dtype.itemsize
            expected = self.meta.get(f"{split}_tokens", n)
            if n != expected or path.stat().st_size % self.dtype.itemsize:
                raise UserError(f"{path} holds {n} tokens but meta.json says {expected}; "
                                f"the dataset is damaged, run prepare.py again")
            self.sizes[split] = n

        # document mode: a dataset of documents, each starting with the boundary token eot_id
        self.eot_id = self.meta.get("eot_id")
        self.documents = self.meta.get("documents") in DOCUMENT_MODES and self.eot_id is not None
        self._row_starts = {}  # (split, block_size) -> where document-mode rows may start
        self._fingerprint = None  # fingerprint(), once read
        # instruction data (JSONL): a uint8 flag per token, 1 where it is a target in the loss
        self.mask_paths = None
        if "loss_mask" in self.meta:
            self.mask_paths = {split: folder / self.meta["loss_mask"][split] for split in self.paths}
            for split, path in self.mask_paths.items():
                if not path.is_file() or path.stat().st_size != self.sizes[split]:
                    raise UserError(f"{path} is missing or does not hold one flag per token of "
                                    f"{self.paths[split]}; run prepare.py for {name!r} again")
        self.files = {split: open(path, "rb") for split, path in self.paths.items()}  # see the class docstring
        self.mask_files = {split: open(path, "rb") for split, path in self.mask_paths.items()} if self.mask_paths else None
        # what sampling needs to wrap a prompt as the records were (see template.py)
        self.instruct = {"template": self.meta["template"], "chat": bool(self.meta.get("chat"))} \
            if "template" in self.meta else None

    def fingerprint(self) -> str:
        """A short hash of what the dataset is (its sources' sha256s, token counts, tokenizer,
        template, the first and last 64 KB of each split), not of where it lies: a resumed run
        tells by it that its data changed. Read once: the files are held open, so it cannot change."""
        if self._fingerprint is not None:
            return self._fingerprint
        meta = {k: v for k, v in self.meta.items() if k not in ("sources", "version")}
        meta["sources"] = sorted(str(s.get("sha256")) for s in self.meta.get("sources", []) if isinstance(s, dict))
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        for split in ("train", "val"):
            f = self.files[split]
            size = f.seek(0, 2)
            for at in (0, max(0, size - 65536)):
                f.seek(at)
                digest.update(f.read(65536))
        self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def row_starts(self, split: str, block_size: int) -> np.ndarray:
        """Document mode: every document start (its boundary token) and, inside a document
        longer than block_size, every block_size tokens after it; only starts that leave a
        whole window (block_size + 1 tokens). Found once per split by one pass over it."""
        key = (split, block_size)
        if key not in self._row_starts:
            data = np.memmap(self.files[split], dtype=self.dtype, mode="r")
            bounds = np.flatnonzero(data == self.eot_id)  # each document's start; the last closes the split
            firsts, lengths = bounds[:-1], np.diff(bounds)  # lengths count the boundary token
            more = (lengths - 1) // block_size  # windows after the first one of each document
            doc = np.repeat(np.arange(len(firsts)), more)
            k = np.arange(len(doc)) - np.repeat(np.cumsum(more) - more, more) + 1  # 1, 2, .. per document
            starts = np.sort(np.concatenate([firsts, firsts[doc] + k * block_size]))
            starts = starts[starts + block_size + 1 <= len(data)]
            if self.mask_paths:  # a window with no target in the loss teaches nothing (and its loss is 0/0)
                in_loss = np.concatenate([[0], np.cumsum(np.memmap(self.mask_files[split], dtype=np.uint8,
                                                                    mode="r"), dtype=np.int64)])
                starts = starts[in_loss[starts + block_size + 1] > in_loss[starts + 1]]
                if len(starts) == 0:
                    raise UserError(f"no window of --block_size={block_size} tokens in the {split} split holds "
                                    f"a token in the loss; use a larger --block_size")
            self._row_starts[key] = starts
        return self._row_starts[key]

    def get_batch(self, split, batch_size, block_size, generator, device):
        """Random windows: x (B, T) and the next-token targets y (B, T), int64 on device.
        Document mode: rows start at row_starts, and a third tensor gives each token's
        position in its document (B, T) for the model."""
        data = np.memmap(self.files[split], dtype=self.dtype, mode="r")
        if self.documents:
            row_starts = self.row_starts(split, block_size)
            starts = row_starts[torch.randint(len(row_starts), (batch_size,), generator=generator).numpy()]
        else:
            starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
        windows = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T+1)
        xy = torch.from_numpy(windows)
        batch = [xy[:, :-1], xy[:, 1:]]
        if self.mask_paths:  # targets out of the loss become -1, which the cross-entropy ignores
            flags = np.memmap(self.mask_files[split], dtype=np.uint8, mode="r")
            out = torch.from_numpy(flags[starts[:, None] + np.arange(1, block_size + 1)] == 0)  # (B, T)
            batch[1] = batch[1].masked_fill(out, -1)
        if self.documents:
            batch.append(document_positions(batch[0], self.eot_id))
        if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
            return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
        return tuple(t.contiguous().to(device) for t in batch)


def document_positions(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """x (B, T) -> each token's index in its document (B, T): 0 at every boundary token and
    at the row's first token, counting up to the next boundary."""
    i = torch.arange(x.size(1))
    start = torch.where(x == eot_id, i, 0).cummax(dim=1).values  # the last boundary at or before i
    return i - start
