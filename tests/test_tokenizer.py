"""tokenizer.py: the BPE trainer, .tiktoken files, the tokenizer.json conversion, checkpoint directories."""

import base64
import json
import pickle
import unicodedata
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

import tokenizer

DATA = Path(__file__).parent / "data"
NEOX_JSON = DATA / "gpt-neox-20b.json"

UNICODE_TEXT = (
    "Café, naïve, Ærøskøbing, São Paulo — “quotes” and ‘apostrophes’.\n"
    "東京は日本の首都です。北京欢迎你。서울 특별시.\n"
    "Emoji: 🙂🚀 👩‍💻 🇫🇷 ❤️\n"
    "Decomposed: e\u0301 a\u0308, Greek: Ελληνικά, Cyrillic: Русский, Arabic: العربية\n"
    "Spaces:  two,     five,                         twenty-five.\ttab\t\ttabs\r\n"
    "Code:\n    def f(x):\n        return x ** 2  # comment\n\n\n"
    "Numbers 3.14159 2,718 1e-10 0xFF, and trailing spaces   "
)


def training_corpus():
    lines = [f"Line {i}: {UNICODE_TEXT.splitlines()[i % 7]} {'spam ' * (i % 5)}the end." for i in range(200)]
    return ["\n".join(lines[:100]), "\n".join(lines[100:])]


# ---------------------------------------------------------------------------------------------------------
# train_bpe
# ---------------------------------------------------------------------------------------------------------

def test_trainer_learns_the_merges_computed_by_hand():
    # "aaabdaaabac" is one pre-token. Counts: aa 4, ab 2, rest 1 -> merge "aa" (256).
    # Then aa+a 2, a+b 2: tie, lower ranks win, (97, 98) < (256, 97) -> "ab" (257).
    # Then aa+ab 2 -> "aaab" (258). Then every pair counts 1; the lowest ranks are a+c -> "ac" (259).
    enc = tokenizer.train_bpe(["aaabdaaabac"], vocab_size=256 + 4 + 1)
    learned = {rank: token for token, rank in enc._mergeable_ranks.items() if rank >= 256}
    assert learned == {256: b"aa", 257: b"ab", 258: b"aaab", 259: b"ac"}
    assert enc.eot_token == 260 and enc.n_vocab == 261
    assert enc.encode("aaabdaaabac") == [258, ord("d"), 258, 259]


def test_trainer_merges_stay_inside_pretokens_and_skip_special_tokens():
    # pre-tokens "ab" and " ab": a+b counts 2 -> "ab"; then " "+"ab" -> " ab"; "b " never forms
    enc = tokenizer.train_bpe(["ab ab<|endoftext|>"], vocab_size=256 + 2 + 1)
    learned = {rank: token for token, rank in enc._mergeable_ranks.items() if rank >= 256}
    assert learned == {256: b"ab", 257: b" ab"}
    with pytest.raises(ValueError, match="no adjacent token pairs left"):
        tokenizer.train_bpe(["ab ab<|endoftext|>"], vocab_size=256 + 3 + 1)


def test_trainer_is_deterministic_and_round_trips_unicode():
    first = tokenizer.train_bpe(training_corpus(), vocab_size=600)
    second = tokenizer.train_bpe(training_corpus(), vocab_size=600)
    assert first._mergeable_ranks == second._mergeable_ranks
    assert first.n_vocab == 600 and first.eot_token == 599
    ids = first.encode(UNICODE_TEXT)
    assert first.decode(ids) == UNICODE_TEXT
    assert len(ids) < len(UNICODE_TEXT.encode("utf-8")) / 2  # the merges compress the text they were learned on
    assert first.encode("a<|endoftext|>b", allowed_special="all") == [ord("a"), 599, ord("b")]
    with pytest.raises(ValueError, match="disallowed special token"):
        first.encode("a<|endoftext|>b")


def test_trainer_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 257"):
        tokenizer.train_bpe(["abc"], vocab_size=200)


def test_byte_encoding():
    enc = tokenizer.byte_encoding()
    ids = enc.encode(UNICODE_TEXT)
    assert ids == list(UNICODE_TEXT.encode("utf-8"))
    assert enc.decode(ids) == UNICODE_TEXT
    assert enc.eot_token == 256 and enc.n_vocab == 257


# ---------------------------------------------------------------------------------------------------------
# .tiktoken files
# ---------------------------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    enc = tokenizer.train_bpe(training_corpus(), vocab_size=400, special_tokens=("<|endoftext|>", "<|pad|>"),
                              name="small")
    path = tmp_path / "small.tiktoken"
    tokenizer.save_tiktoken(enc, path)
    # the ranks file is tiktoken's own format; the special tokens are in the companion file
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == enc._mergeable_ranks
    loaded = tokenizer.load_tiktoken(path)
    assert loaded.name == "small"
    assert loaded._mergeable_ranks == enc._mergeable_ranks
    assert loaded._special_tokens == {"<|endoftext|>": 398, "<|pad|>": 399}
    assert loaded.encode(UNICODE_TEXT + "<|pad|>", allowed_special="all") == \
        enc.encode(UNICODE_TEXT + "<|pad|>", allowed_special="all")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.tiktoken", "small.tiktoken.json"]  # no temp files


def test_ranks_file_without_companion_gets_endoftext_after_the_ranks(tmp_path):
    path = tmp_path / "plain.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)))
    enc = tokenizer.load_tiktoken(path)
    assert enc.eot_token == 256 and enc.encode("hi") == [104, 105]


def test_load_tiktoken_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        tokenizer.load_tiktoken(tmp_path / "missing.tiktoken")
    path = tmp_path / "clash.tiktoken"
    tokenizer.save_tiktoken(tokenizer.byte_encoding(), path)
    Path(str(path) + ".json").write_text(json.dumps(
        {"name": "clash", "pat_str": tokenizer.GPT2_PATTERN, "special_tokens": {"<|endoftext|>": 7}}))
    with pytest.raises(ValueError, match=r"special token ids \[7\]"):
        tokenizer.load_tiktoken(path)
    path.write_bytes(b"YQ== 0\nnot-a-rank-line\n")
    with pytest.raises(ValueError, match=r"clash\.tiktoken:2: not a 'base64\(token\) rank' line"):
        tokenizer.load_tiktoken(path)


def test_load_tiktoken_reads_a_file_rewritten_in_place(tmp_path):
    # tiktoken's own loader caches files by path: it would return the first encoding again
    path = tmp_path / "t.tiktoken"
    tokenizer.save_tiktoken(tokenizer.train_bpe(["aaaa"], vocab_size=258), path)
    assert tokenizer.load_tiktoken(path).n_vocab == 258
    tokenizer.save_tiktoken(tokenizer.byte_encoding(), path)
    assert tokenizer.load_tiktoken(path).n_vocab == 257


# ---------------------------------------------------------------------------------------------------------
# tokenizer.json conversion on a hand-made file
# ---------------------------------------------------------------------------------------------------------

# Bytes as ByteLevel writes them: "Ġ" is the space byte, "Ċ" the newline, "Ã" "©" the two bytes of "é".
# The ids do NOT follow merge order: "ab" is merged before "Ġa" but has the higher id. The added tokens not in
# the vocab take the next ids, in file order, as `tokenizers` numbers them.
TINY_VOCAB = {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "Ġ": 4, "Ċ": 5, "Ã": 6, "©": 7,
              "Ġa": 8, "cc": 9, "ab": 10, "Ã©": 11}
TINY_MERGES = ["Ã ©", "a b", "Ġ a", "c c"]


def tiny_tokenizer_json(merges_as_pairs=False):
    def added(content, id, special, normalized):
        return {"id": id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": normalized, "special": special}

    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [added("<|endoftext|>", 0, True, False), added("  ", 12, False, True),
                         added("   ", 13, False, True)],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": TINY_VOCAB,
                  "merges": [m.split(" ") for m in TINY_MERGES] if merges_as_pairs else TINY_MERGES},
    })


TINY_CASES = {
    "ab": [10],
    " ab": [4, 10],  # a+b (merge 1) before Ġ+a (merge 2); ranking by id would give Ġa b = [8, 2]
    " a": [8],
    "ccc": [9, 3],  # leftmost first
    "ab\nab": [10, 5, 10],
    "a b": [1, 4, 2],
    "a  b": [1, 12, 2],  # a run of 2 spaces is an added token, matched before pre-tokenisation
    "a   b": [1, 13, 2],  # longest match
    "a    b": [1, 13, 4, 2],  # 4 spaces: 3-space token, then " b" as a pre-token
    "ab  ": [10, 12],
    "ab ": [10, 4],
    "\u00e9": [11],
    "e\u0301": [11],  # NFC composes e + combining acute into é
    "ab<|endoftext|>ab": [10, 0, 10],
    "": [],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tok_tiny.json"
    path.write_text(tiny_tokenizer_json())
    return path


def test_tiny_conversion_gives_the_hand_computed_ids(tiny):
    enc = tokenizer.from_hf_tokenizer_json(tiny)
    for text, ids in TINY_CASES.items():
        assert enc.encode(text, allowed_special="all") == ids, text
        assert enc.decode(ids) == unicodedata.normalize("NFC", text)
    assert enc.eot_token == 0 and enc.n_vocab == 14
    assert enc.special_tokens_set == {"<|endoftext|>"} and enc.is_special_token(0) and not enc.is_special_token(12)


def test_tiny_conversion_matches_tokenizers(tiny):
    tokenizers = pytest.importorskip("tokenizers")
    reference = tokenizers.Tokenizer.from_file(str(tiny))
    for text, ids in TINY_CASES.items():
        assert reference.encode(text, add_special_tokens=False).ids == ids, text


def test_tiny_conversion_merges_as_pairs(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(tiny_tokenizer_json(merges_as_pairs=True))
    enc = tokenizer.from_hf_tokenizer_json(path)
    assert all(enc.encode(text, allowed_special="all") == ids for text, ids in TINY_CASES.items())


def test_tiny_conversion_special_tokens_and_errors(tiny):
    enc = tokenizer.from_hf_tokenizer_json(tiny)
    with pytest.raises(ValueError, match="disallowed special token"):
        enc.encode("ab<|endoftext|>")
    with pytest.raises(ValueError, match=r"bytes \['0x64'\] of this text are not in the tokenizer's vocab"):
        enc.encode("abd")
    assert enc.encode_ordinary("a  b") == [1, 12, 2]
    assert enc.encode_batch(["ab", " ab"]) == [[10], [4, 10]]
    assert pickle.loads(pickle.dumps(enc)).encode(" ab   ab") == [4, 10, 13, 10]


def test_conversion_refuses_what_it_cannot_reproduce(tmp_path):
    spec = json.loads(tiny_tokenizer_json())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    path = tmp_path / "prefix.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="unsupported tokenizer.json: pre_tokenizer"):
        tokenizer.from_hf_tokenizer_json(path)
    spec = json.loads(tiny_tokenizer_json())
    spec["added_tokens"][1]["id"] = 1  # tokenizers would number it 12, after the 12 vocab tokens
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="has id 1 in the tokenizer.json, but tokenizers would give it id 12"):
        tokenizer.from_hf_tokenizer_json(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        tokenizer.from_hf_tokenizer_json(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        tokenizer.from_hf_tokenizer_json(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------------------
# GPT-NeoX-20B's tokenizer.json against the tokenizers package
# ---------------------------------------------------------------------------------------------------------

NEOX_TEXTS = [
    "",
    "Hello world",
    UNICODE_TEXT,
    "It was the best of times, it was the worst of times; it was the age of wisdom... I'll say it's 'done'.",
    "\n".join(" " * n + f"x_{n} = {n}  # indented by {n}" for n in range(2, 31)),
    "def f(x):\n\tif x:\n\t\treturn [x,\n\t\t        x]\n    else:\n        pass\n",
    "Table:\n| a    | bb   |\n|------|------|\n| 1    | 22   |\n",
    "Numbers: 0 7 42 1234567890 3.14159 -2.5e-3 1,000,000 12:30 2024-01-01",
    "NFC vs NFD: caf\u00e9 / cafe\u0301, \u00c5ngstr\u00f6m / A\u030angstro\u0308m, \u1e69 / s\u0323\u0307",
    "one<|endoftext|>two<|padding|>three <|endoftext|>  four",
    "<|endoftext|>",
    "trailing spaces   ",
    "  leading spaces and a lone space at the end ",
    " " * 100,
    "tabs\t\t\tand\u00a0no-break\u3000ideographic\u2028line\u2029paragraph\r\nCRLF",
    "Emoji 👩‍👩‍👧‍👦 🏳️‍🌈 and CJK 漢字かなカナ한글",
]


@pytest.fixture(scope="module")
def neox():
    return tokenizer.from_hf_tokenizer_json(NEOX_JSON)


def test_neox_known_ids(neox):
    # facts of GPT-NeoX-20B's file, which hold without the tokenizers package
    assert neox.eot_token == 0 and neox.encode("<|padding|>", allowed_special="all") == [1]
    assert neox.encode("Hello world") == [12092, 1533]
    for n in range(2, 25):
        assert neox.encode(" " * n) == [50278 - n]  # 2 spaces are 50276, 24 spaces are 50254
    assert neox.encode(" " * 30 + "x") == [50254, 50272, 89]
    assert neox.encode("    return x") == [50274, 2309, 1269]
    assert neox.n_vocab == 50277


def test_neox_matches_tokenizers(neox):
    tokenizers = pytest.importorskip("tokenizers")
    reference = tokenizers.Tokenizer.from_file(str(NEOX_JSON))
    for text in NEOX_TEXTS:
        expected = reference.encode(text, add_special_tokens=False).ids
        ids = neox.encode(text, allowed_special="all")
        assert ids == expected, text
        assert neox.decode(ids) == unicodedata.normalize("NFC", text)
        if "<|" not in text:
            assert neox.encode(text) == expected


# ---------------------------------------------------------------------------------------------------------
# Checkpoint directories
# ---------------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_tiktoken(tmp_path):
    enc = tokenizer.train_bpe(training_corpus(), vocab_size=300)
    tokenizer.save_tokenizer(enc, tmp_path / "ckpt")
    loaded = tokenizer.load_tokenizer(tmp_path / "ckpt")
    assert loaded._mergeable_ranks == enc._mergeable_ranks and loaded.eot_token == enc.eot_token


def test_checkpoint_round_trip_tokenizer_json(tmp_path, tiny):
    enc = tokenizer.from_hf_tokenizer_json(tiny)
    tokenizer.save_tokenizer(tokenizer.byte_encoding(), tmp_path)  # a stale tokenizer.tiktoken ...
    tokenizer.save_tokenizer(enc, tmp_path)  # ... is removed, or it would be read first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    assert (tmp_path / "tokenizer.json").read_text() == tiny.read_text()
    loaded = tokenizer.load_tokenizer(tmp_path)
    assert all(loaded.encode(text, allowed_special="all") == ids for text, ids in TINY_CASES.items())


def test_load_tokenizer_names_both_files_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.tiktoken .* or tokenizer\.json"):
        tokenizer.load_tokenizer(tmp_path)
