"""Tokenizers as tiktoken encodings: train a small byte-level BPE, save and load it, convert GPT-NeoX's.

Every tokenizer in this project is a `tiktoken.Encoding`: `enc.encode(text) -> list[int]`,
`enc.decode(ids) -> str`, `enc.eot_token`, `enc.n_vocab`. Nothing is downloaded here except by
`get_encoding`, which asks tiktoken for its registry encodings.

- `train_bpe` learns a byte-level BPE (the GPT-2 recipe) from text on the CPU.
- `save_tiktoken` / `load_tiktoken` write and read it as a `.tiktoken` ranks file.
- `from_hf_tokenizer_json` turns a Hugging Face byte-level BPE `tokenizer.json` (GPT-NeoX-20B's, which the
  pretrained state-spaces Mamba models use) into an encoding that gives the same ids as the `tokenizers` package.
- `save_tokenizer` / `load_tokenizer` put the tokenizer in, and read it from, a checkpoint directory.

File formats.
`name.tiktoken` is tiktoken's own format: one line per mergeable token, `base64(token bytes) rank`, lowest rank
(highest merge priority) first; `tiktoken.load.load_tiktoken_bpe` reads it. The rest of an encoding -- its name,
its pre-tokenisation regex and its special tokens -- goes to a small companion file `name.tiktoken.json`:
`{"name": ..., "pat_str": ..., "special_tokens": {"<|endoftext|>": 8191}}`. A ranks file without a companion
(for example tiktoken's `r50k_base.tiktoken`) loads with the GPT-2 regex and `<|endoftext|>` right after the
highest rank, which is how GPT-2 numbers it.

Ids. In a tiktoken encoding the id of a token is its rank, and lower ranks merge first. In an encoding
trained here, the special tokens get the ids after all the ranks. A converted tokenizer.json keeps its own
ids (GPT-NeoX: <|endoftext|> is 0), see HFByteLevelBPE.
"""

from __future__ import annotations

import base64
import functools
import heapq
import json
import os
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

import regex
import tiktoken
from tiktoken.core import raise_disallowed_special_token
from tiktoken.load import load_tiktoken_bpe

from mamba import atomic_write

ENDOFTEXT = "<|endoftext|>"

# GPT-2's pre-tokenisation regex as tiktoken writes it for gpt2/r50k_base. The original GPT-2 pattern,
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# splits text the same way (contractions; a letter, digit or punctuation run with at most one leading space;
# whitespace runs that leave their last space to the next word). Hugging Face's ByteLevel pre-tokenizer uses
# the original, so this one pattern serves both the trainer and the tokenizer.json conversion.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# The same with every digit a pre-token of its own (as LLaMA's tokenizer splits numbers): a number is always one
# token per digit, so a 5-digit key is 5 tokens whatever its digits.
DIGITS_PATTERN = GPT2_PATTERN.replace(r" ?\p{N}++", r"\p{N}")

TIKTOKEN_FILE = "tokenizer.tiktoken"  # in a checkpoint directory: a tokenizer trained here
HF_JSON_FILE = "tokenizer.json"  # in a checkpoint directory: a Hugging Face tokenizer (GPT-NeoX's)


# ----------------------------------------------------------------------------------------------------------
# Training a byte-level BPE
# ----------------------------------------------------------------------------------------------------------

def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = (ENDOFTEXT,),
              name: str = "bpe", pattern: str = GPT2_PATTERN) -> tiktoken.Encoding:
    """Learn a byte-level BPE from `texts` (the GPT-2 recipe) and return it as a tiktoken encoding.

    `vocab_size` counts everything: the 256 single bytes (ranks 0..255), the learned merges (ranks 256...),
    and the special tokens (the ids after the ranks), so the result has `n_vocab == vocab_size`.

    The text is split into pre-tokens with `pattern` (GPT2_PATTERN or DIGITS_PATTERN) and merges never cross a
    pre-token boundary, so the corpus is just a table of distinct pre-tokens ("words") and their counts. Each step merges the most
    frequent adjacent pair of tokens, counted over all words; ties go to the pair of lower ranks, so the
    result depends only on the text. After a merge only the words that contained the pair change, and only
    their pairs' counts are updated (an index pair -> words holding it finds them), which is what makes
    thousands of merges on megabytes of text take minutes in plain Python. Special tokens that occur in
    the text are cut out of it before counting, so no merge learns them.
    """
    if isinstance(texts, str):
        raise TypeError("train_bpe takes an iterable of texts, not one string: pass [text]")
    special_tokens = list(special_tokens)
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} is too small: it counts the 256 single bytes and the "
                         f"{len(special_tokens)} special tokens, so it must be at least {256 + len(special_tokens)}")

    word_counts = _count_pretokens(texts, special_tokens, pattern)
    words = [list(word.encode("utf-8")) for word in word_counts]  # each word as token ranks, bytes at first
    counts = list(word_counts.values())

    token_bytes = [bytes([b]) for b in range(256)]  # rank -> the bytes it stands for
    rank_of = {token: rank for rank, token in enumerate(token_bytes)}

    pair_count = Counter()  # (left rank, right rank) -> occurrences in the corpus
    words_with = defaultdict(set)  # (left rank, right rank) -> indices of words that contain it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_count[pair] += counts[i]
            words_with[pair].add(i)
    # max-heap of (-count, left, right); entries whose count went stale are skipped when popped
    heap = [(-n, a, b) for (a, b), n in pair_count.items()]
    heapq.heapify(heap)

    while len(token_bytes) < 256 + n_merges:
        a, b = _pop_most_frequent(heap, pair_count)
        if a is None:
            raise ValueError(f"the text has no adjacent token pairs left after {len(token_bytes) - 256} new "
                             f"tokens: give more text or ask for vocab_size <= "
                             f"{len(token_bytes) + len(special_tokens)}")
        merged = token_bytes[a] + token_bytes[b]
        # Two different pairs can spell the same bytes ("a"+"bc", "ab"+"c"); tiktoken keys tokens by their
        # bytes, so the second merge reuses the first one's rank instead of adding a token.
        new = rank_of.get(merged)
        if new is None:
            new = len(token_bytes)
            token_bytes.append(merged)
            rank_of[merged] = new

        touched = set()
        for i in words_with.pop((a, b)):
            old = words[i]
            word = _merge_pair(old, a, b, new)
            if len(word) == len(old):
                continue  # the index is not pruned on merges, so it can name words that lost the pair
            n = counts[i]
            for pair in zip(old, old[1:]):
                pair_count[pair] -= n
                touched.add(pair)
            for pair in zip(word, word[1:]):
                pair_count[pair] += n
                touched.add(pair)
                words_with[pair].add(i)
            words[i] = word
        for pair in touched:
            if pair_count[pair] > 0:
                heapq.heappush(heap, (-pair_count[pair], *pair))
            else:
                del pair_count[pair]

    specials = {token: len(token_bytes) + k for k, token in enumerate(special_tokens)}
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=rank_of, special_tokens=specials)


def _count_pretokens(texts: Iterable[str], special_tokens: list[str], pattern: str) -> Counter:
    """Distinct pre-tokens of all texts -> how often each occurs; special tokens are cut out first."""
    pretoken = regex.compile(pattern)
    special = regex.compile("|".join(regex.escape(s) for s in special_tokens)) if special_tokens else None
    word_counts = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_bpe needs texts as str, got {type(text).__name__}")
        for part in (special.split(text) if special else [text]):
            word_counts.update(pretoken.findall(part))
    return word_counts


def _pop_most_frequent(heap: list, pair_count: Counter) -> tuple:
    """The pair with the highest current count (ties: lower ranks), or (None, None) when none is left."""
    while heap:
        negative_count, a, b = heapq.heappop(heap)
        if pair_count.get((a, b)) == -negative_count:
            return a, b
    return None, None


def _merge_pair(word: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace each occurrence of a followed by b in word, left to right, by new."""
    out = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def byte_encoding() -> tiktoken.Encoding:
    """The 256 single bytes as tokens 0..255 (no merges) and `<|endoftext|>` = 256: one token per UTF-8 byte."""
    ranks = {bytes([b]): b for b in range(256)}
    return tiktoken.Encoding("bytes", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 256})


# ----------------------------------------------------------------------------------------------------------
# .tiktoken files
# ----------------------------------------------------------------------------------------------------------

def save_tiktoken(encoding: tiktoken.Encoding, path: str | os.PathLike) -> None:
    """Write `encoding` as a `.tiktoken` ranks file at `path` and its companion `path + ".json"` (module docstring)."""
    if isinstance(encoding, HFByteLevelBPE):
        raise TypeError("this encoding was converted from a Hugging Face tokenizer.json: its ids are not merge "
                        "ranks and its added tokens are matched before pre-tokenisation, which a .tiktoken file "
                        "cannot say; keep the tokenizer.json (save_tokenizer does)")
    path = os.fspath(path)
    # tiktoken keeps these three only in private attributes; they are what its own pickling saves
    ranks = encoding._mergeable_ranks
    lines = b"".join(base64.b64encode(token) + b" %d\n" % rank
                     for token, rank in sorted(ranks.items(), key=lambda item: item[1]))
    companion = {"name": encoding.name, "pat_str": encoding._pat_str, "special_tokens": encoding._special_tokens}
    atomic_write(path, lines)
    atomic_write(path + ".json", (json.dumps(companion, indent=1, ensure_ascii=False) + "\n").encode())


def load_tiktoken(path: str | os.PathLike) -> tiktoken.Encoding:
    """Read a `.tiktoken` ranks file and its companion `path + ".json"` if there is one (module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no .tiktoken ranks file at {path!r}")
    ranks = load_tiktoken_bpe(path)
    if not ranks:
        raise ValueError(f"{path!r} holds no tokens: a .tiktoken file has one 'base64-token rank' line per token")
    if os.path.isfile(path + ".json"):
        with open(path + ".json", encoding="utf-8") as f:
            companion = json.load(f)
        missing = {"name", "pat_str", "special_tokens"} - set(companion)
        if missing:
            raise ValueError(f"{path + '.json'!r} lacks {sorted(missing)}; it should hold the name, pat_str and "
                             f"special_tokens of the encoding whose ranks are in {path!r}")
    else:
        companion = {"name": Path(path).stem, "pat_str": GPT2_PATTERN,
                     "special_tokens": {ENDOFTEXT: max(ranks.values()) + 1}}
    specials = companion["special_tokens"]
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path!r} gives the same rank to two tokens; ranks must be distinct")
    clashes = sorted(set(specials.values()) & set(ranks.values()))
    if clashes:
        raise ValueError(f"special token ids {clashes} in {path + '.json'!r} are also ranks of tokens in {path!r}")
    return tiktoken.Encoding(companion["name"], pat_str=companion["pat_str"], mergeable_ranks=ranks,
                             special_tokens=specials)


def get_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken registry encoding ("gpt2", "r50k_base", "cl100k_base", ...); tiktoken fetches its ranks once."""
    known = tiktoken.list_encoding_names()
    if name not in known:
        raise ValueError(f"unknown tiktoken encoding {name!r}; tiktoken knows {known}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as err:  # tiktoken fetches over HTTP: connection, DNS, proxy and hash errors all land here
        raise RuntimeError(
            f"could not fetch the tiktoken encoding {name!r} ({type(err).__name__}: {err}); this machine may be "
            f"offline. Use a tokenizer on disk instead: tokenizer.load_tiktoken('file.tiktoken') for a ranks "
            f"file, or tokenizer.from_hf_tokenizer_json('tokenizer.json') for a Hugging Face tokenizer") from err


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table, used by Hugging Face ByteLevel to write byte strings as text.

    The 188 bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves;
    the other 68 (controls, space, soft hyphen...) get the characters 256, 257, ... in byte order, so the
    space byte 0x20 is 'Ġ' (U+0120) and the newline 0x0A is 'Ċ' (U+010A).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


class HFByteLevelBPE(tiktoken.Encoding):
    """A Hugging Face byte-level BPE `tokenizer.json` as a tiktoken encoding, with the ids `tokenizers` gives.

    `encode(text, allowed_special="all")` equals `tokenizers.Tokenizer.encode(text, add_special_tokens=False).ids`
    (see the known differences below); `encode(text)` keeps tiktoken's rule of refusing special-token text such
    as "<|endoftext|>" unless it is allowed. Hugging Face encodes in this order, and so does this class:
      1. added tokens whose "normalized" is false (GPT-NeoX: <|endoftext|> 0, <|padding|> 1) are cut out of the
         raw text, leftmost-longest;
      2. the rest is normalized (GPT-NeoX: NFC, so "e" + U+0301 becomes "é");
      3. added tokens whose "normalized" is true are cut out of that (GPT-NeoX: runs of 2..24 spaces,
         ids 50276..50254; they are not special, so they are always matched: 4-space indentation is one token
         and the word after it loses its leading space);
      4. each remaining piece is split with the GPT-2 regex and each pre-token is BPE-merged.
    A tokenizer.json gives token ids in `vocab` and merge priority by the order of `merges`, and the two orders
    need not agree; tiktoken merges by rank, so step 4 runs on a private encoding whose ranks are the single
    bytes (0..255) then the merges in file order, and its ranks are mapped to the vocab ids. Decoding uses the
    vocab ids directly: the added tokens are this encoding's tiktoken special tokens.

    Known differences from `tokenizers`. Neither of the first two can happen with GPT-NeoX's file: a pair that
    is not in `merges` but spells a vocab token is merged here (tiktoken ranks tokens, not pairs), and a byte
    missing from the vocab is an error here where `tokenizers` drops it. Third, the normal form comes from
    Python's `unicodedata` (Unicode 14 in Python 3.11), while `tokenizers` normalizes with older Unicode
    tables: a combining mark added to Unicode since 2017 (e.g. U+0D3B) next to another combining mark can be
    put in a different order; 2 of 30,000 random strings drawn from all of Unicode differed this way, no
    prose, code or text in common scripts did.
    """

    def __init__(self, tokenizer_json: str, name: str = "hf_byte_level_bpe"):
        spec = json.loads(tokenizer_json)
        _check_supported(spec)
        model = spec["model"]
        self.tokenizer_json = tokenizer_json  # kept verbatim: save_tokenizer writes it back
        byte_of = {char: b for b, char in bytes_to_unicode().items()}

        def token_bytes(token: str) -> bytes:
            try:
                return bytes(byte_of[char] for char in token)
            except KeyError as err:
                raise ValueError(f"token {token!r} in the tokenizer.json has the character {err.args[0]!r}, which "
                                 f"is not in the ByteLevel byte table: is this a byte-level BPE?") from None

        added = spec.get("added_tokens") or []
        _check_added_token_ids(added, model["vocab"])
        self._added = {t["content"]: t["id"] for t in added}
        self._special = {t["content"] for t in added if t.get("special", False)}
        self._special_ids = {self._added[t] for t in self._special}
        # step 1 takes the tokens with "normalized": false (by default the special ones), step 3 the others
        self._added_in_raw_text = {t["content"] for t in added if not t.get("normalized", not t.get("special"))}
        added_ids = set(self._added.values())
        vocab = {token_bytes(token): i for token, i in model["vocab"].items() if i not in added_ids}
        self._normalization_form = spec["normalizer"]["type"] if spec.get("normalizer") else None

        merge_ranks = {bytes([b]): b for b in range(256)}
        rank_to_id = [vocab.get(bytes([b])) for b in range(256)]  # None: a byte this vocab lacks
        for merge in model["merges"]:
            pair = merge.split(" ") if isinstance(merge, str) else merge  # "a b" or ["a", "b"]
            if len(pair) != 2:
                raise ValueError(f"merge {merge!r} in the tokenizer.json is not two tokens ('a b' or ['a', 'b'])")
            left, right = pair
            merged = token_bytes(left) + token_bytes(right)
            if merged in merge_ranks:
                continue  # a later merge spelling the same token: the first one fixes its priority
            if merged not in vocab:
                raise ValueError(f"merge {merge!r} makes {left + right!r}, which is not in the vocab")
            merge_ranks[merged] = len(rank_to_id)
            rank_to_id.append(vocab[merged])
        self._rank_to_id = rank_to_id
        self._missing_bytes = [b for b in range(256) if rank_to_id[b] is None]
        self._merge_order = tiktoken.Encoding(f"{name}/merge-order", pat_str=GPT2_PATTERN,
                                              mergeable_ranks=merge_ranks, special_tokens={})
        super().__init__(name, pat_str=GPT2_PATTERN, mergeable_ranks=vocab, special_tokens=self._added)

    def encode(self, text: str, *, allowed_special=frozenset(), disallowed_special="all") -> list[int]:
        """Token ids of text; special tokens follow tiktoken's allowed_special / disallowed_special rules."""
        if allowed_special == "all":
            allowed_special = self._special
        if disallowed_special == "all":
            disallowed_special = self._special - set(allowed_special)
        for token in disallowed_special:
            if token in text:
                raise_disallowed_special_token(token)
        matched = {token for token in self._added if token not in self._special or token in allowed_special}
        raw_pattern = _longest_first(frozenset(matched & self._added_in_raw_text))
        normalized_pattern = _longest_first(frozenset(matched - self._added_in_raw_text))
        ids = []
        for piece, is_added in _split_on(raw_pattern, text):  # step 1
            if is_added:
                ids.append(self._added[piece])
                continue
            if self._normalization_form:
                piece = unicodedata.normalize(self._normalization_form, piece)  # step 2
            for part, part_is_added in _split_on(normalized_pattern, piece):  # step 3
                ids.extend([self._added[part]] if part_is_added else self._bpe(part))  # step 4
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of text, special-token text encoded as plain text (non-special added tokens still match)."""
        return self.encode(text, disallowed_special=())

    def encode_to_numpy(self, text: str, *, allowed_special=frozenset(), disallowed_special="all"):
        """encode(), as a numpy uint32 array."""
        import numpy as np
        return np.asarray(self.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special),
                          dtype=np.uint32)

    def encode_with_unstable(self, *args, **kwargs):
        raise NotImplementedError("encode_with_unstable is not available for a tokenizer converted from "
                                  "tokenizer.json; use encode")

    @property
    def special_tokens_set(self) -> set[str]:
        return set(self._special)

    def is_special_token(self, token: int) -> bool:
        return token in self._special_ids

    def _bpe(self, text: str) -> list[int]:
        """Step 4: pre-tokenise and merge by merge order, then turn ranks into vocab ids."""
        ids = [self._rank_to_id[rank] for rank in self._merge_order.encode_ordinary(text)]
        if self._missing_bytes and None in ids:
            missing = sorted({b for b in text.encode("utf-8") if b in self._missing_bytes})
            raise ValueError(f"bytes {[hex(b) for b in missing]} of this text are not in the tokenizer's vocab")
        return ids

    def __reduce__(self):
        return HFByteLevelBPE, (self.tokenizer_json, self.name)


def from_hf_tokenizer_json(path: str | os.PathLike) -> HFByteLevelBPE:
    """Read a Hugging Face byte-level BPE tokenizer.json (GPT-NeoX-20B's, GPT-2's) as a tiktoken encoding."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {str(path)!r}")
    text = path.read_text(encoding="utf-8")
    try:
        return HFByteLevelBPE(text, name=path.stem)
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err})") from None


def _check_supported(spec: dict) -> None:
    """Refuse, with the reason, a tokenizer.json whose encoding HFByteLevelBPE would not reproduce."""
    def refuse(what):
        raise ValueError(f"unsupported tokenizer.json: {what}; this converter handles byte-level BPE tokenizers "
                         f"like GPT-2's and GPT-NeoX-20B's")

    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
        refuse(f"the model is {model.get('type')!r}, not a BPE with vocab and merges")
    for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges"):
        if model.get(option):
            refuse(f"model option {option}={model[option]!r}")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        refuse(f"pre_tokenizer {json.dumps(pre)} (need ByteLevel with use_regex true and add_prefix_space false)")
    normalizer = spec.get("normalizer")
    if normalizer and normalizer.get("type") not in ("NFC", "NFD", "NFKC", "NFKD"):
        refuse(f"normalizer {json.dumps(normalizer)} (need none or one Unicode normal form)")
    for token in spec.get("added_tokens") or []:
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            refuse(f"added token {token['content']!r} with lstrip, rstrip or single_word")


def _check_added_token_ids(added: list[dict], vocab: dict[str, int]) -> None:
    """Refuse added-token ids that `tokenizers` would not use. It takes an added token's id from the vocab
    when the vocab has it, and numbers the others itself, after the vocab in file order, whatever the file says."""
    next_id = len(vocab)
    for token in added:
        expected = vocab.get(token["content"])
        if expected is None:
            expected, next_id = next_id, next_id + 1
        if token["id"] != expected:
            raise ValueError(f"added token {token['content']!r} has id {token['id']} in the tokenizer.json, but "
                             f"tokenizers would give it id {expected} (its vocab id, or for a token not in the "
                             f"vocab the next id after the vocab's {len(vocab)} tokens, in file order)")


@functools.lru_cache(maxsize=64)
def _longest_first(tokens: frozenset) -> regex.Pattern | None:
    """A regex matching any of tokens, the longest where several start at one place (leftmost-longest)."""
    if not tokens:
        return None
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=lambda t: (-len(t), t))))


def _split_on(pattern: regex.Pattern | None, text: str):
    """Yield (piece, True) for each match of pattern in text and (piece, False) for the text between them."""
    start = 0
    for match in pattern.finditer(text) if pattern else ():
        if match.start() > start:
            yield text[start:match.start()], False
        yield match.group(), True
        start = match.end()
    if start < len(text):
        yield text[start:], False


# ----------------------------------------------------------------------------------------------------------
# Checkpoint directories
# ----------------------------------------------------------------------------------------------------------

def save_tokenizer(encoding: tiktoken.Encoding, checkpoint_dir: str | os.PathLike) -> None:
    """Put the tokenizer in a checkpoint directory: `tokenizer.tiktoken` (+ its .json companion), or, for an
    encoding converted from a Hugging Face tokenizer.json, a copy of that file as `tokenizer.json` (a stale
    `tokenizer.tiktoken` there is removed, since load_tokenizer would read it first)."""
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(encoding, HFByteLevelBPE):
        atomic_write(str(directory / HF_JSON_FILE), encoding.tokenizer_json.encode("utf-8"))
        for stale in (directory / TIKTOKEN_FILE, directory / (TIKTOKEN_FILE + ".json")):
            stale.unlink(missing_ok=True)
    else:
        save_tiktoken(encoding, directory / TIKTOKEN_FILE)


def load_tokenizer(checkpoint_dir: str | os.PathLike) -> tiktoken.Encoding:
    """The tokenizer of a checkpoint directory: `tokenizer.tiktoken` if present, else `tokenizer.json`."""
    directory = Path(checkpoint_dir)
    if (directory / TIKTOKEN_FILE).is_file():
        return load_tiktoken(directory / TIKTOKEN_FILE)
    if (directory / HF_JSON_FILE).is_file():
        return from_hf_tokenizer_json(directory / HF_JSON_FILE)
    raise FileNotFoundError(f"no tokenizer in {str(directory)!r}: expected {TIKTOKEN_FILE} (a tokenizer trained "
                            f"with this project) or {HF_JSON_FILE} (a Hugging Face tokenizer, e.g. GPT-NeoX-20B's "
                            f"for the state-spaces Mamba models)")
