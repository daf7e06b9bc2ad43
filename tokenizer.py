"""Tokenizers as tiktoken encodings: train a small byte-level BPE, save and load it, convert GPT-NeoX's.

Every tokenizer here is a `tiktoken.Encoding` (`encode`, `decode`, `eot_token`, `n_vocab`):
- `train_bpe` learns a byte-level BPE (the GPT-2 recipe); `save_tiktoken` / `load_tiktoken` write and read it.
- `from_hf_tokenizer_json` reads a Hugging Face byte-level BPE `tokenizer.json` (GPT-NeoX-20B's, used by the
  state-spaces Mamba models) with the ids the `tokenizers` package gives.
- `save_tokenizer` / `load_tokenizer` put the tokenizer in, and read it from, a checkpoint directory.

`name.tiktoken` is tiktoken's format: one `base64(token bytes) rank` line per token, lowest rank (first merged)
first. The name, regex and special tokens go to a companion `name.tiktoken.json`:
`{"name": ..., "pat_str": ..., "special_tokens": {"<|endoftext|>": 8191}}`. Without a companion (e.g. tiktoken's
`r50k_base.tiktoken`) a ranks file loads with the GPT-2 regex and `<|endoftext|>` after the highest rank, as GPT-2.
A token's id is its rank; trained special tokens come after the ranks; a converted tokenizer.json keeps its ids.
"""

import base64
import functools
import heapq
import json
import os
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import regex
import tiktoken
from tiktoken.core import raise_disallowed_special_token

from mamba import atomic_write

ENDOFTEXT = "<|endoftext|>"

# GPT-2's pre-tokenisation regex as tiktoken writes it for r50k_base; it splits text as the original GPT-2
# pattern does, which Hugging Face's ByteLevel pre-tokenizer uses, so it serves the trainer and the conversion.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# The same with every digit a pre-token of its own (as LLaMA splits numbers): one token per digit.
DIGITS_PATTERN = GPT2_PATTERN.replace(r" ?\p{N}++", r"\p{N}")

TIKTOKEN_FILE = "tokenizer.tiktoken"  # in a checkpoint directory: a tokenizer trained here
HF_JSON_FILE = "tokenizer.json"  # in a checkpoint directory: a Hugging Face tokenizer (GPT-NeoX's)


# ----------------------------------------------------------------------------------------------------------
# Training a byte-level BPE

def train_bpe(texts, vocab_size, special_tokens=(ENDOFTEXT,), name="bpe", pattern=GPT2_PATTERN):
    """Learn a byte-level BPE from `texts` (the GPT-2 recipe) and return it as a tiktoken encoding.

    `vocab_size` counts the 256 single bytes (ranks 0..255), the merges (ranks 256...) and the special tokens
    (ids after the ranks). Merges never cross a pre-token boundary (`pattern`), so the corpus is a table of
    distinct pre-tokens ("words") and their counts. Each step merges the most frequent adjacent pair, ties to
    the lower ranks, so the result depends only on the text; after a merge only the words holding the pair are
    recounted. Special tokens are cut out of the text first, so no merge learns them.
    """
    assert not isinstance(texts, str), "train_bpe takes an iterable of texts: pass [text]"
    special_tokens = list(special_tokens)
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} is too small: with 256 bytes and the special tokens it must be "
                         f"at least {256 + len(special_tokens)}")

    pretoken = regex.compile(pattern)
    special = regex.compile("|".join(regex.escape(t) for t in special_tokens)) if special_tokens else None
    word_counts = Counter()
    for text in texts:
        for part in (special.split(text) if special else [text]):
            word_counts.update(pretoken.findall(part))
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
        while heap and pair_count.get(heap[0][1:]) != -heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            raise ValueError(f"the text has no adjacent token pairs left after {len(token_bytes) - 256} new tokens: "
                             f"give more text or ask for vocab_size <= {len(token_bytes) + len(special_tokens)}")
        _, a, b = heapq.heappop(heap)
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


def _merge_pair(word, a, b, new):
    """Replace each occurrence of a followed by b in word, left to right, by new."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def byte_encoding():
    """The 256 single bytes as tokens 0..255 (no merges) and `<|endoftext|>` = 256: one token per UTF-8 byte."""
    ranks = {bytes([b]): b for b in range(256)}
    return tiktoken.Encoding("bytes", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 256})


# ----------------------------------------------------------------------------------------------------------
# .tiktoken files

def save_tiktoken(encoding, path):
    """Write `encoding` as a `.tiktoken` ranks file at `path` and its companion `path + ".json"` (module docstring)."""
    assert not isinstance(encoding, HFByteLevelBPE), "a converted tokenizer.json stays a tokenizer.json"
    path = os.fspath(path)
    # tiktoken keeps these only in private attributes (the ones its own pickling saves)
    ranks = encoding._mergeable_ranks
    lines = b"".join(base64.b64encode(token) + b" %d\n" % rank
                     for token, rank in sorted(ranks.items(), key=lambda item: item[1]))
    companion = {"name": encoding.name, "pat_str": encoding._pat_str, "special_tokens": encoding._special_tokens}
    atomic_write(path, lines)
    atomic_write(path + ".json", (json.dumps(companion, indent=1, ensure_ascii=False) + "\n").encode())


def load_tiktoken(path):
    """Read a `.tiktoken` ranks file and its companion `path + ".json"` if there is one (module docstring)."""
    path = os.fspath(path)
    # read here: tiktoken's load_tiktoken_bpe caches a file by its path, so it returns a file rewritten in
    # place (a checkpoint trained again) as it was before
    ranks = {}
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{line_number}: not a 'base64(token) rank' line: {line[:80]!r}") from None
    if not ranks:
        raise ValueError(f"{path!r} holds no tokens: a .tiktoken file has one 'base64(token) rank' line per token")
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path!r} gives the same rank to two tokens; ranks must be distinct")
    if os.path.isfile(path + ".json"):
        with open(path + ".json", encoding="utf-8") as f:
            companion = json.load(f)
        if missing := {"name", "pat_str", "special_tokens"} - set(companion):
            raise ValueError(f"{path + '.json'!r} lacks {sorted(missing)} of the encoding whose ranks are in {path!r}")
    else:  # as GPT-2
        companion = {"name": Path(path).stem, "pat_str": GPT2_PATTERN,
                     "special_tokens": {ENDOFTEXT: max(ranks.values()) + 1}}
    if clashes := sorted(set(companion["special_tokens"].values()) & set(ranks.values())):
        raise ValueError(f"special token ids {clashes} in {path + '.json'!r} are also ranks of tokens in {path!r}")
    return tiktoken.Encoding(companion["name"], pat_str=companion["pat_str"], mergeable_ranks=ranks,
                             special_tokens=companion["special_tokens"])


# ----------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (byte-level BPE)

def bytes_to_unicode():
    """GPT-2's byte -> character table, with which Hugging Face ByteLevel writes bytes as text: the 188 printable
    Latin-1 bytes stand for themselves, the other 68 get chr(256), chr(257), ... (space 'Ġ', newline 'Ċ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


class HFByteLevelBPE(tiktoken.Encoding):
    """A Hugging Face byte-level BPE `tokenizer.json` as a tiktoken encoding, with the ids `tokenizers` gives.

    `encode(text, allowed_special="all")` equals `tokenizers.Tokenizer.encode(text, add_special_tokens=False).ids`;
    `encode(text)` refuses special-token text unless allowed, as tiktoken does. The steps are Hugging Face's:
      1. added tokens with "normalized": false (GPT-NeoX: <|endoftext|> 0, <|padding|> 1) are cut out of the raw
         text, leftmost-longest;
      2. the rest is normalized (GPT-NeoX: NFC, so "e" + U+0301 becomes "é");
      3. added tokens with "normalized": true are cut out of that (GPT-NeoX: runs of 2..24 spaces; not special,
         so always matched: 4-space indentation is one token and the next word loses its leading space);
      4. each piece is split with the GPT-2 regex and each pre-token is BPE-merged.
    Ids come from `vocab` and merge priority from the order of `merges`, which need not agree: step 4 runs on a
    private encoding ranked bytes then merges in file order, whose ranks map to vocab ids. Decoding uses the ids.

    Known differences from `tokenizers`. Neither of the first two can happen with GPT-NeoX's file: a pair that
    is not in `merges` but spells a vocab token is merged here (tiktoken ranks tokens, not pairs), and a byte
    missing from the vocab is an error here where `tokenizers` drops it. Third, the normal form comes from
    Python's `unicodedata` (Unicode 14 in Python 3.11), `tokenizers` has older tables: a combining mark added
    since 2017 (e.g. U+0D3B) next to another combining mark can be put in a different order (rare text only).
    """

    def __init__(self, tokenizer_json, name="hf_byte_level_bpe"):
        spec = json.loads(tokenizer_json)
        _check_supported(spec)
        model = spec["model"]
        self.tokenizer_json = tokenizer_json  # kept verbatim: save_tokenizer writes it back
        byte_of = {char: b for b, char in bytes_to_unicode().items()}

        def token_bytes(token):
            try:
                return bytes(byte_of[char] for char in token)
            except KeyError as err:
                raise ValueError(f"token {token!r} has {err.args[0]!r}, not in the ByteLevel byte table") from None

        added = spec.get("added_tokens") or []
        next_id = len(model["vocab"])  # tokenizers takes an added token's vocab id, else numbers it after the vocab
        for token in added:
            expected = model["vocab"].get(token["content"])
            if expected is None:
                expected, next_id = next_id, next_id + 1
            if token["id"] != expected:
                raise ValueError(f"added token {token['content']!r} has id {token['id']} in the tokenizer.json, but "
                                 f"tokenizers would give it id {expected}")
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
        self._merge_order = tiktoken.Encoding(f"{name}/merge-order", pat_str=GPT2_PATTERN,
                                              mergeable_ranks=merge_ranks, special_tokens={})
        super().__init__(name, pat_str=GPT2_PATTERN, mergeable_ranks=vocab, special_tokens=self._added)

    def encode(self, text, *, allowed_special=frozenset(), disallowed_special="all"):
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

    def encode_ordinary(self, text):
        """Token ids of text, special-token text encoded as plain text (non-special added tokens still match)."""
        return self.encode(text, disallowed_special=())

    def encode_to_numpy(self, text, **kwargs):
        """encode(), as a numpy uint32 array (tiktoken's own would use the wrong ids)."""
        import numpy as np
        return np.asarray(self.encode(text, **kwargs), dtype=np.uint32)

    def encode_with_unstable(self, *args, **kwargs):
        raise NotImplementedError("encode_with_unstable is not available for a converted tokenizer.json; use encode")

    @property
    def special_tokens_set(self):
        return set(self._special)

    def is_special_token(self, token):
        return token in self._special_ids

    def _bpe(self, text):
        """Step 4: pre-tokenise and merge by merge order, then turn ranks into vocab ids."""
        ids = [self._rank_to_id[rank] for rank in self._merge_order.encode_ordinary(text)]
        if None in ids:
            missing = sorted({b for b in text.encode("utf-8") if self._rank_to_id[b] is None})
            raise ValueError(f"bytes {[hex(b) for b in missing]} of this text are not in the tokenizer's vocab")
        return ids

    def __reduce__(self):
        return HFByteLevelBPE, (self.tokenizer_json, self.name)


def from_hf_tokenizer_json(path):
    """Read a Hugging Face byte-level BPE tokenizer.json (GPT-NeoX-20B's, GPT-2's) as a tiktoken encoding."""
    path = Path(path)
    try:
        return HFByteLevelBPE(path.read_text(encoding="utf-8"), name=path.stem)
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err})") from None


def _check_supported(spec):
    """Refuse, with the reason, a tokenizer.json whose encoding HFByteLevelBPE would not reproduce."""
    def refuse(what):
        raise ValueError(f"unsupported tokenizer.json: {what} (this converts byte-level BPEs like GPT-NeoX's)")

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


@functools.lru_cache(maxsize=64)
def _longest_first(tokens):
    """A regex capturing any of tokens (a frozenset), the longest where several start at one place
    (leftmost-longest); None for no tokens."""
    if not tokens:
        return None
    return regex.compile("(" + "|".join(regex.escape(t) for t in sorted(tokens, key=lambda t: (-len(t), t))) + ")")


def _split_on(pattern, text):
    """(piece, True) for each match of pattern (None: no match) in text, (piece, False) for the non-empty text
    between them."""
    pieces = pattern.split(text) if pattern else [text]  # the matches are at the odd indices
    return [(piece, i % 2 == 1) for i, piece in enumerate(pieces) if piece]


# ----------------------------------------------------------------------------------------------------------
# Checkpoint directories

def save_tokenizer(encoding, checkpoint_dir):
    """Put the tokenizer in a checkpoint directory: `tokenizer.tiktoken` (+ companion), or a converted
    tokenizer.json as it was read (a stale `tokenizer.tiktoken` goes, as load_tokenizer would read it first)."""
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(encoding, HFByteLevelBPE):
        atomic_write(str(directory / HF_JSON_FILE), encoding.tokenizer_json.encode("utf-8"))
        for stale in (directory / TIKTOKEN_FILE, directory / (TIKTOKEN_FILE + ".json")):
            stale.unlink(missing_ok=True)
    else:
        save_tiktoken(encoding, directory / TIKTOKEN_FILE)


def load_tokenizer(checkpoint_dir):
    """The tokenizer of a checkpoint directory: `tokenizer.tiktoken` if present, else `tokenizer.json`."""
    directory = Path(checkpoint_dir)
    if (directory / TIKTOKEN_FILE).is_file():
        return load_tiktoken(directory / TIKTOKEN_FILE)
    if (directory / HF_JSON_FILE).is_file():
        return from_hf_tokenizer_json(directory / HF_JSON_FILE)
    raise FileNotFoundError(f"no tokenizer in {str(directory)!r}: expected {TIKTOKEN_FILE} (trained here) or "
                            f"{HF_JSON_FILE} (Hugging Face's, e.g. GPT-NeoX-20B's)")
