"""Tokenizer: encode/decode round trips, descriptions, and clear errors."""
import json

import numpy as np
import pytest
import tiktoken

from errors import UserError
from tokenizer import Tokenizer

TEXT = "Hello, wörld! 你好 😀\n\tcafé"


def test_char_round_trip_and_sorted_vocab():
    tok = Tokenizer.char_from_text(TEXT)
    assert tok.name == "char" and tok.eot_id is None
    assert tok.chars == sorted(set(TEXT)) and tok.vocab_size == len(set(TEXT))
    ids = tok.encode(TEXT)
    assert ids == [tok.chars.index(c) for c in TEXT]
    assert tok.decode(ids) == TEXT
    assert tok.decode(np.array(ids, dtype=np.uint16)) == TEXT
    assert tok.decode_bytes(ids) == TEXT.encode("utf-8")


def test_char_unknown_characters():
    tok = Tokenizer.char_from_text("abc")
    with pytest.raises(UserError) as e:
        tok.encode("abxyz")
    msg = str(e.value)
    assert "'x'" in msg and "'z'" in msg and "pass --drop_unknown" in msg
    assert tok.encode("abxyzc", drop_unknown=True) == [0, 1, 2]
    with pytest.raises(UserError, match="and 2 more"):
        tok.encode("".join(chr(0x400 + i) for i in range(12)))


@pytest.mark.parametrize("name", ["gpt2", "r50k_base", "cl100k_base", "o200k_base"])
def test_tiktoken_round_trip(name):
    tok = Tokenizer.tiktoken(name)
    enc = tiktoken.get_encoding(name)
    assert tok.vocab_size == enc.n_vocab and tok.eot_id == enc.eot_token
    ids = tok.encode(TEXT)
    assert ids == enc.encode_ordinary(TEXT)
    assert tok.decode(ids) == TEXT
    assert b"".join(tok.decode_bytes([i]) for i in ids) == TEXT.encode("utf-8")
    # a literal "<|endoftext|>" in text is ordinary text, never the end-of-text id
    assert tok.eot_id not in tok.encode("a<|endoftext|>b")
    assert tok.decode(tok.encode("a<|endoftext|>b")) == "a<|endoftext|>b"


@pytest.mark.parametrize("make", [lambda: Tokenizer.char_from_text(TEXT), lambda: Tokenizer.tiktoken("gpt2")])
def test_describe_round_trip_through_json(make):
    tok = make()
    d = json.loads(json.dumps(tok.describe()))
    assert set(d) == ({"name", "vocab_size", "eot_id"} | ({"chars"} if tok.name == "char" else set()))
    again = Tokenizer.from_description(d)
    assert again.describe() == tok.describe()
    assert again.encode(TEXT) == tok.encode(TEXT)


def test_from_description_accepts_meta_json():
    tok = Tokenizer.from_description({"version": 1, "tokenizer": "cl100k_base", "vocab_size": 100277,
                                      "dtype": "uint32", "eot_id": 100257})
    assert tok.name == "cl100k_base" and tok.vocab_size > 1 << 16
    tok = Tokenizer.from_description({"tokenizer": "char", "chars": ["a", "b"], "vocab_size": 2})
    assert tok.decode([1, 0]) == "ba"


def test_bad_descriptions():
    with pytest.raises(UserError, match="unknown tokenizer 'nope'.*gpt2"):
        Tokenizer.from_description({"name": "nope"})
    with pytest.raises(UserError, match="vocab_size"):
        Tokenizer.from_description({"name": "gpt2", "vocab_size": 123})
    with pytest.raises(UserError, match="chars"):
        Tokenizer.from_description({"name": "char"})


def test_unknown_tiktoken_name_lists_valid_names():
    with pytest.raises(UserError) as e:
        Tokenizer.tiktoken("gpt3")
    assert "char" in str(e.value) and "cl100k_base" in str(e.value) and "o200k_base" in str(e.value)


def test_offline_without_cache_says_how_to_fix(monkeypatch, tmp_path):
    import tiktoken.load
    import tiktoken.registry

    def no_network(blobpath):
        raise ConnectionError(f"cannot reach {blobpath}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings already loaded
    with pytest.raises(UserError, match="TIKTOKEN_CACHE_DIR"):
        Tokenizer.tiktoken("gpt2")
