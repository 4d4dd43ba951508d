"""The tokenizer shared by prepare.py, train.py and sample.py: char-level, a tiktoken
encoding, or a byte-level BPE vocabulary trained on the user's text (`bpe`).

A Tokenizer is fully described by a small JSON-able dict (describe()), which prepare.py
writes into meta.json and train.py copies into the checkpoint, so sample.py rebuilds the
exact same tokenizer with from_description() and needs nothing from data/.

A trained vocabulary is stored the way tiktoken stores its own: the byte string of every
token in rank order (base64), the regex that splits text before BPE and the special
tokens. from_description() builds a tiktoken.Encoding from them, so tiktoken is the one
tokenizer at run time, whatever the vocabulary.

A dataset prepared in documents mode (prepare.py --documents=line|blank) starts every
document with a boundary token, eot_id: tiktoken's <|endoftext|>, the trained
vocabulary's <|endoftext|>, or for char-level one extra id, len(chars), that no character
can take. `documents` records the mode ("line" or "blank"; None otherwise).
"""
import base64
import os

import numpy as np
import tiktoken

from errors import UserError, listed

CHAR = "char"
BPE = "bpe"  # a byte-level BPE vocabulary trained by prepare.py --tokenizer=bpe:N
NAMED_DATASETS = {"shakespeare_char": CHAR, "shakespeare": "gpt2"}  # `prepare.py NAME`: name -> its tokenizer
EOT = "<|endoftext|>"  # the document-boundary token of tiktoken and of trained vocabularies
# How a trained vocabulary splits text before BPE: by lines. Merges may cross spaces but never
# a line end, so records made of a few recurring words (boxing combos, log lines) get tokens
# for whole moves or fields; GPT-2's word regex caps a 12,000-combo file at 334 tokens.
LINE_PATTERN = r"[^\n]+|\n+"
# how a documents dataset was cut: prepare.py --documents=line|blank, or JSONL records (one each)
DOCUMENT_MODES = ("line", "blank", "jsonl")


def _id_list(ids) -> list[int]:
    """Plain Python ints from a list, numpy array or torch tensor of ids."""
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, the alphabet of HF tokenizers'
    ByteLevel pre-tokenizer (openai/gpt-2 src/encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """Char-level (id = index into `chars`) or a tiktoken encoding such as gpt2."""

    def __init__(self, name: str, vocab_size: int, eot_id: int | None,
                 chars: list[str] | None = None, encoding: tiktoken.Encoding | None = None,
                 documents: str | None = None):
        self.name = name  # "char", "bpe" (trained) or a tiktoken encoding name
        self.vocab_size = vocab_size
        self.eot_id = eot_id  # <|endoftext|> id; for char len(chars) in documents mode, else None
        self.chars = chars  # char-level only: the ordered vocabulary
        self.documents = documents  # "line" or "blank" for a documents dataset, else None
        self._encoding = encoding
        if chars is not None:
            # Code points sorted, with the id of each: a vectorised lookup for encode.
            codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
            self._order = np.argsort(codepoints, kind="stable").astype(np.uint32)
            self._sorted_codepoints = codepoints[self._order]

    # ---- construction ----

    @classmethod
    def char_from_text(cls, chars_iterable, documents: str | None = None) -> "Tokenizer":
        """Char-level vocabulary: the sorted set of characters (of a string, or any iterable).
        With documents, one more id, len(chars), is the document boundary."""
        chars = sorted(set(chars_iterable))
        if documents:
            return cls(CHAR, len(chars) + 1, len(chars), chars=chars, documents=documents)
        return cls(CHAR, len(chars), None, chars=chars)

    @classmethod
    def bpe_from_ranks(cls, ranks: list[bytes], pattern: str = LINE_PATTERN,
                       documents: str | None = None) -> "Tokenizer":
        """A trained byte-level vocabulary: ranks[i] is the bytes of token i (every single byte
        among them, so any text encodes), then <|endoftext|> as the last id."""
        mergeable = {token: rank for rank, token in enumerate(ranks)}
        if len(mergeable) != len(ranks) or any(bytes([b]) not in mergeable for b in range(256)):
            raise UserError("the trained vocabulary is damaged (a repeated token or a missing byte); "
                            "re-run prepare.py")
        eot = len(ranks)
        encoding = tiktoken.Encoding(name=BPE, pat_str=pattern, mergeable_ranks=mergeable,
                                     special_tokens={EOT: eot})
        return cls(BPE, eot + 1, eot, encoding=encoding, documents=documents)

    @classmethod
    def tiktoken(cls, name: str) -> "Tokenizer":
        """A tiktoken encoding by name (gpt2, r50k_base, cl100k_base, o200k_base, ...)."""
        valid = tiktoken.list_encoding_names()
        if name not in valid:
            raise UserError(f"unknown tokenizer {name!r}; valid: {', '.join([CHAR] + valid)}, or bpe:N (a "
                            f"vocabulary of N tokens trained on your text)")
        try:
            encoding = tiktoken.get_encoding(name)
        except Exception as e:  # network errors (requests, urllib, OSError), hash mismatch
            first = (str(e).splitlines() or [""])[0]
            reason = f"{type(e).__name__}: {first if len(first) <= 150 else first[:150] + '...'}"
            cache = os.environ.get("TIKTOKEN_CACHE_DIR")
            fix = (f"TIKTOKEN_CACHE_DIR={cache} does not hold {name}'s files: copy them there from a machine "
                   f"that has them (or use --tokenizer char)" if cache else
                   "tiktoken downloads its files on first use: without internet, set TIKTOKEN_CACHE_DIR to a "
                   "folder holding tiktoken's cached files (or use --tokenizer char)")
            raise UserError(f"could not load the tiktoken encoding {name!r} ({reason}); {fix}") from None
        return cls(name, encoding.n_vocab, encoding.eot_token, encoding=encoding)

    @classmethod
    def from_description(cls, d: dict) -> "Tokenizer":
        """Inverse of describe(); also accepts a meta.json dict (name under "tokenizer")."""
        name = d.get("name", d.get("tokenizer"))
        if name is None:
            raise UserError("tokenizer description has no 'name' (or 'tokenizer') key")
        documents = d.get("documents") if d.get("documents") in DOCUMENT_MODES else None
        if name == CHAR:
            if not d.get("chars"):
                raise UserError("char tokenizer description has no 'chars' list; re-run prepare.py")
            chars = list(d["chars"])
            if d.get("eot_id") not in (None, len(chars)):
                raise UserError(f"char tokenizer description has eot_id {d['eot_id']}, but the boundary "
                                f"id of {len(chars)} characters is {len(chars)}; re-run prepare.py")
            if d.get("eot_id") is None:
                tok = cls(CHAR, len(chars), None, chars=chars)
            else:
                tok = cls(CHAR, len(chars) + 1, len(chars), chars=chars, documents=documents)
        elif name == BPE:
            bpe = d.get("bpe")
            try:
                ranks = [base64.b64decode(t, validate=True) for t in bpe["ranks"]]
                pattern = bpe["pattern"]
            except (TypeError, KeyError, ValueError):
                raise UserError("the trained (bpe) tokenizer description has no valid 'bpe' ranks and "
                                "pattern; re-run prepare.py") from None
            tok = cls.bpe_from_ranks(ranks, pattern, documents)
        else:
            tok = cls.tiktoken(name)
            tok.documents = documents
        if "vocab_size" in d and d["vocab_size"] != tok.vocab_size:
            raise UserError(f"tokenizer {name!r} has vocab_size {tok.vocab_size}, but the "
                            f"description says {d['vocab_size']}; re-run prepare.py")
        return tok

    def describe(self) -> dict:
        """JSON-able description: {"name", "vocab_size", "eot_id"} (+ "chars" for char, "bpe"
        for a trained vocabulary: {"pattern", "ranks": base64 bytes of each token in rank
        order, "special_tokens"}, "documents" in documents mode)."""
        d = {"name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id}
        if self.chars is not None:
            d["chars"] = list(self.chars)
        if self.name == BPE:
            enc = self._encoding
            ranks = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab) if i != self.eot_id]
            d["bpe"] = {"pattern": enc._pat_str, "special_tokens": {EOT: self.eot_id},
                        "ranks": [base64.b64encode(t).decode("ascii") for t in ranks]}
        if self.documents:
            d["documents"] = self.documents
        return d

    @property
    def encoding(self) -> "tiktoken.Encoding | None":  # quoted: the classmethod tiktoken shadows the module here
        """The tiktoken Encoding (tiktoken names and trained vocabularies; None for char), e.g. for export.py."""
        return self._encoding

    # ---- encode / decode ----

    def encode_to_numpy(self, text: str, drop_unknown: bool = False) -> np.ndarray:
        """Token ids of `text` as a uint32 array (fast path used by prepare.py).

        BPE treats the whole text as ordinary text: a literal "<|endoftext|>" in the data
        is encoded as its characters, never as the end-of-text token.
        """
        if self._encoding is not None:
            # Same ids as encode_ordinary (no allowed specials), without a Python list.
            return self._encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        pos = np.searchsorted(self._sorted_codepoints, codepoints)
        pos = np.minimum(pos, len(self._sorted_codepoints) - 1)
        known = self._sorted_codepoints[pos] == codepoints
        if not known.all():
            if not drop_unknown:
                unknown = sorted({chr(c) for c in codepoints[~known].tolist()})
                raise UserError(f"{len(unknown)} character(s) not in the char vocabulary: "
                                f"{listed(map(repr, unknown), 10)}; pass --drop_unknown to drop them")
            pos = pos[known]
        return self._order[pos]

    def encode(self, text: str, drop_unknown: bool = False) -> list[int]:
        """Token ids of `text`. Char: unknown characters raise UserError unless drop_unknown."""
        return self.encode_to_numpy(text, drop_unknown=drop_unknown).tolist()

    def decode(self, ids) -> str:
        ids = _id_list(ids)
        if self._encoding is not None:
            return self._encoding.decode(ids)
        # the char-level document boundary is not text: it decodes to nothing
        return "".join(self.chars[i] for i in ids if i != self.eot_id)

    def decode_bytes(self, ids) -> bytes:
        """Raw bytes, for a streaming printer with an incremental UTF-8 decoder (a BPE token
        can hold part of a character)."""
        if self._encoding is not None:
            return self._encoding.decode_bytes(_id_list(ids))
        return self.decode(ids).encode("utf-8")

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


# tiktoken encodings under two names with the same ranks, pattern and special tokens: the same ids
SAME_IDS = {"r50k_base": "gpt2"}


def mismatch(model: dict, data: dict, boundary: bool = True) -> str | None:
    """How the tokenizer a dataset was prepared with (data) differs from a model's, both as
    describe() gives them, in a few words; None when the same ids mean the same text. boundary:
    also compare the document-boundary token (off where a pretrained model's vocabulary may
    hold more than the data's)."""
    def kind(d: dict) -> str:
        return {CHAR: "char-level", BPE: "a trained BPE vocabulary"}.get(d["name"], f"{d['name']} (tiktoken)")

    if SAME_IDS.get(model["name"], model["name"]) != SAME_IDS.get(data["name"], data["name"]):
        return f"the model's tokenizer is {kind(model)}, the data's {kind(data)}"
    if model.get("chars") != data.get("chars"):
        ours, theirs = set(model.get("chars") or ()), set(data.get("chars") or ())
        show = lambda chars: ", ".join(repr(c) for c in sorted(chars)[:5]) + (" ..." if len(chars) > 5 else "")  # noqa: E731
        parts = ([f"has {show(theirs - ours)}, which the model never saw"] if theirs - ours else []) + \
                ([f"lacks {show(ours - theirs)}"] if ours - theirs else [])
        return ("both are char-level, but the data " + (", and ".join(parts) if parts else
                "has the model's characters in another order") + ": its ids mean other characters")
    if model.get("bpe") != data.get("bpe"):
        return "both are trained BPE vocabularies, but different ones"
    if boundary and model.get("eot_id") != data.get("eot_id"):
        with_eot = "the data" if data.get("eot_id") is not None else "the model"
        return f"only {with_eot} has a document-boundary token (prepare.py --documents)"
    return None
