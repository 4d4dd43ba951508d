"""Tokenizer: encode/decode round trips, descriptions, and clear errors."""
import base64
import json

import numpy as np
import pytest
import tiktoken

from errors import UserError
from tokenizer import LINE_PATTERN, Tokenizer, bytes_to_unicode, mismatch

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
    lone = json.loads('"a\\ud800"')  # a JSON record may hold half a surrogate pair
    assert Tokenizer.char_from_text(lone).encode(lone) == [0, 1]


def test_char_unknown_characters():
    tok = Tokenizer.char_from_text("abc")
    with pytest.raises(UserError) as e:
        tok.encode("abxyz")
    msg = str(e.value)
    assert "'x'" in msg and "'z'" in msg and "pass --drop_unknown" in msg
    assert tok.encode("abxyzc", drop_unknown=True) == [0, 1, 2]
    with pytest.raises(UserError, match="pass --drop_unknown"):  # prepare.py and eval.py call it so
        tok.encode_to_numpy("abx")
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
    assert str(e.value) == (f"unknown tokenizer 'gpt3'; valid: {', '.join(['char'] + tiktoken.list_encoding_names())}, "
                            f"or bpe:N (a vocabulary of N tokens trained on your text)")


def test_offline_without_cache_says_how_to_fix(monkeypatch, tmp_path):
    import tiktoken.load
    import tiktoken.registry

    reason = "cannot reach the server: " + "no route to host, " * 20  # long: cut to 150 characters

    def no_network(blobpath):
        raise ConnectionError(reason)

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings already loaded
    with pytest.raises(UserError) as e:
        Tokenizer.tiktoken("gpt2")
    assert str(e.value) == (f"could not load the tiktoken encoding 'gpt2' (ConnectionError: {reason[:150]}...); "
                            f"TIKTOKEN_CACHE_DIR={tmp_path} does not hold gpt2's files: copy them there from a "
                            f"machine that has them (or use --tokenizer char)")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")  # no cache named: how to name one
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "empty"))  # (tiktoken's other cache, empty too)
    with pytest.raises(UserError, match="without internet, set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's "
                                        r"cached files \(or use --tokenizer char\)$"):
        Tokenizer.tiktoken("gpt2")


def test_a_trained_vocabulary_round_trips_through_its_description():
    ranks = [bytes([i]) for i in range(256)] + [b"ab", b"abc"]
    tok = Tokenizer.bpe_from_ranks(ranks, documents="line")
    assert (tok.name, tok.vocab_size, tok.eot_id, tok.documents) == ("bpe", 259, 258, "line")
    assert tok.encode("abc\nab") == [257, 10, 256]  # merges inside a line, never across its end
    d = json.loads(json.dumps(tok.describe()))
    assert d["bpe"]["pattern"] == LINE_PATTERN and d["bpe"]["special_tokens"] == {"<|endoftext|>": 258}
    assert [base64.b64decode(t) for t in d["bpe"]["ranks"]] == ranks and d["documents"] == "line"
    again = Tokenizer.from_description(d)
    assert again.describe() == d and again.encode("abc\nab") == [257, 10, 256]
    assert again.decode([257, again.eot_id]) == "abc<|endoftext|>"


def test_a_damaged_trained_vocabulary_is_refused():
    byte_ranks = [bytes([i]) for i in range(256)]
    for ranks in (byte_ranks + [b"a"], byte_ranks[1:]):  # a repeated token, a missing byte
        with pytest.raises(UserError, match=r"^the trained vocabulary is damaged \(a repeated token or a missing "
                                            r"byte\); re-run prepare.py$"):
            Tokenizer.bpe_from_ranks(ranks)
    for bpe in (None, {"ranks": ["not base64!"], "pattern": LINE_PATTERN}, {"ranks": []}):
        with pytest.raises(UserError, match="has no valid 'bpe' ranks and pattern"):
            Tokenizer.from_description({"name": "bpe", "bpe": bpe})


def test_a_char_documents_vocabulary_has_one_more_id_that_decodes_to_nothing():
    tok = Tokenizer.char_from_text("ba", documents="blank")
    assert (tok.vocab_size, tok.eot_id, tok.documents) == (3, 2, "blank")
    assert tok.decode([0, 2, 1]) == "ab" and tok.decode_bytes([2, 0]) == b"a"
    d = tok.describe()
    assert d == {"name": "char", "vocab_size": 3, "eot_id": 2, "chars": ["a", "b"], "documents": "blank"}
    again = Tokenizer.from_description(d)
    assert (again.vocab_size, again.eot_id, again.documents) == (3, 2, "blank")
    assert Tokenizer.from_description({**d, "documents": "pages"}).documents is None  # not a mode: none
    with pytest.raises(UserError, match="has eot_id 5, but the boundary id of 2 characters is 2"):
        Tokenizer.from_description({**d, "eot_id": 5})
    plain = Tokenizer.char_from_text("ba")
    assert (plain.vocab_size, plain.eot_id, plain.documents) == (2, None, None)
    assert repr(plain) == "Tokenizer(name='char', vocab_size=2)"
    assert Tokenizer.from_description({"name": "gpt2", "documents": "line"}).documents == "line"


def test_bytes_to_unicode_is_gpt2s_byte_alphabet():
    hf = pytest.importorskip("transformers.convert_slow_tokenizer")
    assert bytes_to_unicode() == hf.bytes_to_unicode()


def test_a_char_documents_description_rebuilds_the_same_tokenizer_and_bad_ones_say_why():
    d = Tokenizer.char_from_text("ba", documents="line").describe()
    again = Tokenizer.from_description(d)
    assert again.describe() == d and again.decode([1, 2, 0]) == "ba"
    with pytest.raises(UserError, match=r"^tokenizer description has no 'name' \(or 'tokenizer'\) key$"):
        Tokenizer.from_description({"vocab_size": 3})
    with pytest.raises(UserError, match=r"^char tokenizer description has no 'chars' list; re-run prepare.py$"):
        Tokenizer.from_description({"name": "char", "chars": []})


def test_unknown_characters_are_listed_ten_at_most():
    tok = Tokenizer.char_from_text("abc")
    for n, more in ((10, ""), (11, " and 1 more")):
        unknown = [chr(0x400 + i) for i in range(n)]
        shown = ", ".join(repr(c) for c in unknown[:10])
        with pytest.raises(UserError) as e:
            tok.encode("a" + "".join(unknown))
        assert str(e.value) == (f"{n} character(s) not in the char vocabulary: {shown}{more}; "
                                "pass --drop_unknown to drop them")


def test_a_trained_description_with_a_stray_character_in_a_rank_is_refused():
    d = Tokenizer.bpe_from_ranks([bytes([i]) for i in range(256)] + [b"ab"]).describe()
    d["bpe"]["ranks"][-1] += "!"  # base64 of b"ab" with a character outside the alphabet: not silently dropped
    with pytest.raises(UserError, match="has no valid 'bpe' ranks and pattern"):
        Tokenizer.from_description(d)


def test_mismatch_tells_apart_two_trained_vocabularies_of_one_size():
    """Two bpe:N vocabularies of the same size map the same ids to other bytes: refused."""
    base = [bytes([b]) for b in range(256)]
    a = Tokenizer.bpe_from_ranks(base + [b"ab", b"abc"])
    b = Tokenizer.bpe_from_ranks(base + [b"xy", b"xyz"])
    assert a.vocab_size == b.vocab_size
    assert mismatch(a.describe(), b.describe()) == "both are trained BPE vocabularies, but different ones"
    assert mismatch(a.describe(), Tokenizer.bpe_from_ranks(base + [b"ab", b"abc"]).describe()) is None


def test_gpt2_and_r50k_base_are_one_vocabulary_under_two_names():
    """tiktoken's r50k_base is GPT-2's encoding (the same ranks, pattern and special tokens): data
    prepared with either is read by a model of the other; cl100k_base is not."""
    gpt2, r50k = Tokenizer.tiktoken("gpt2"), Tokenizer.tiktoken("r50k_base")
    text = "Hello, world: 12345 caf\u00e9 \U0001f94a<|endoftext|>"
    assert gpt2.encoding.encode(text, allowed_special="all") == r50k.encoding.encode(text, allowed_special="all")
    assert gpt2.eot_id == r50k.eot_id and gpt2.vocab_size == r50k.vocab_size
    assert mismatch(gpt2.describe(), r50k.describe()) is None and mismatch(r50k.describe(), gpt2.describe()) is None
    assert "cl100k_base" in mismatch(gpt2.describe(), {"name": "cl100k_base"})


def test_mismatch_tells_a_plain_model_from_a_documents_dataset_of_the_same_characters():
    """A documents dataset's ids hold a boundary id the plain char model never had."""
    plain, docs = Tokenizer.char_from_text("abc"), Tokenizer.char_from_text("abc", documents="line")
    assert "document-boundary" in mismatch(plain.describe(), docs.describe())
    assert "document-boundary" in mismatch(docs.describe(), plain.describe())
    assert mismatch(plain.describe(), docs.describe(), boundary=False) is None  # a pretrained model's case
    assert mismatch(docs.describe(), Tokenizer.char_from_text("abc", documents="line").describe()) is None


def test_mismatch_says_which_side_differs_and_how():
    """The words a user reads when a model meets data of another tokenizer: the two kinds, the
    characters on each side, the side that has the boundary token."""
    from tokenizer import mismatch
    char, docs = Tokenizer.char_from_text("abc"), Tokenizer.char_from_text("abc", documents="line")
    bpe = Tokenizer.bpe_from_ranks([bytes([b]) for b in range(256)])
    assert mismatch(char.describe(), bpe.describe()) == ("the model's tokenizer is char-level, the data's a trained "
                                                         "BPE vocabulary")
    assert mismatch(char.describe(), docs.describe()) == ("only the data has a document-boundary token "
                                                          "(prepare.py --documents)")
    assert mismatch(docs.describe(), char.describe()) == ("only the model has a document-boundary token "
                                                          "(prepare.py --documents)")
    assert mismatch(char.describe(), Tokenizer.char_from_text("abd").describe()) == (
        "both are char-level, but the data has 'd', which the model never saw, and lacks 'c': its ids mean "
        "other characters")
    assert mismatch(char.describe(), {**char.describe(), "chars": ["c", "b", "a"]}) == (
        "both are char-level, but the data has the model's characters in another order: its ids mean other "
        "characters")


def test_a_char_vocabulary_in_any_order_encodes_each_character_to_its_own_index():
    """A description's chars are the ids' order, sorted or not (the sorted copy is only for lookup)."""
    tok = Tokenizer.from_description({"name": "char", "chars": ["b", "c", "a"]})
    assert tok.encode("abc") == [2, 0, 1]
    assert tok.decode(tok.encode("cab")) == "cab"
    assert tok.encode("axb", drop_unknown=True) == [2, 0]
