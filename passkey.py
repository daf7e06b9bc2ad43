"""
Passkey retrieval samples, shared by training (train.py) and evaluation (eval.py).

The format of Landmark Attention (Mohtashami & Jaggi 2023), used by LongLoRA, DeciMamba and LongMamba:

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will ...
    <haystack: filler text>
    The pass key is 68452. Remember it. 68452 is the pass key.                <- the needle, at depth d
    <haystack: filler text>
    What is the pass key? The pass key is                                     <- the model continues " 68452"

The key is a random 5-digit number. Lengths are counted in tokens of the model's tokenizer, any object with
`encode(str) -> list[int]` and `decode(list[int]) -> str` (a tiktoken.Encoding). The depth d in [0, 1] places
the needle in the filler: 0 right after the intro, 1 right before the question, in between at the sentence
boundary nearest to d of the filler.

The filler is natural prose by default (a `Haystack` of a book's sentences, e.g. data/war_and_peace.txt, whose
"eval" split is text the model never trained on), or the classic repeated "The grass is green. The sky is
blue. ..." sentences with filler="repeat". At small scale the classic filler is too easy: a small Mamba learns
to barely decay its state on it and then does not fail beyond its training length. Prose makes that failure
visible.

    import passkey, tokenizer
    encoding = tokenizer.load_tokenizer("checkpoints/mamba-testbed")
    haystack = passkey.Haystack(open("data/war_and_peace.txt", encoding="utf-8").read(), "eval")
    sample = passkey.make_sample(encoding, haystack, length=4096, depth=0.5, seed=0)
    sample.prompt_ids          # 4096 token ids, to prefill
    sample.answer              # "68452", to compare with passkey.score(generated_text, sample.answer)

A sample costs no quadratic work, so 1M-token prompts are cheap: the haystack is tokenized once per encoding
and the filler is cut from that token stream (_assemble); the fixed pieces (intro, needle, question) are
tokenized on their own. Every piece after the intro starts with its own whitespace (" It was ...",
"\\nThe pass key ..."), so for GPT-2 style tokenizers the concatenation is the tokenization of the prompt's
text (except where the filler's first sentence was cut).
"""

import functools
import re
from dataclasses import dataclass

import numpy as np

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"        # what the model should generate after QUESTION
ANSWER_END = "."         # follows the answer in training examples, so the model learns where the number ends
REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLERS = ("prose", "repeat")
TRAIN_FRACTION = 0.9     # the "train" split's share of a haystack's sentences (Haystack)
KEY_LOW, KEY_HIGH = 10000, 100000   # keys are drawn uniformly from [KEY_LOW, KEY_HIGH): 5 digits

# A sentence: its leading whitespace, then text up to a sentence end (. ! ? and any closing quotes or
# brackets) before whitespace, or up to the end of the line (headings), or up to the end of the text.
_SENTENCE = re.compile(r"""\s*\S[^\n]*?(?:[.!?]+["'”’)\]]*(?=\s)|(?=\n)|\Z)""")


# ----------------------------------------------------------------------------------------------------------
# The haystack

class Haystack:
    """A text cut into sentences, the filler that hides the needle.

    text:  the whole text (e.g. a book); whitespace is kept, "\\r\\n" becomes "\\n".
    split: "train" (first 90 % of the sentences), "eval" (last 10 %) or "all".
    Token ids are computed once per encoding object, on first use, and cached here (pass the same object).
    "".join(haystack.sentences) is the split's text, e.g. for language-model windows that must not overlap the
    eval split. A text too short to give the split a sentence raises ValueError (it comes from a user's file).
    """

    def __init__(self, text, split):
        # Every sentence, the first one included, must begin with whitespace so that sentences concatenate
        # cleanly, also where the filler wraps from the end of the text to its start.
        text = text.replace("\r\n", "\n").rstrip()
        text = text if text[:1].isspace() else "\n" + text
        sentences = _SENTENCE.findall(text)
        train_count = int(len(sentences) * TRAIN_FRACTION)
        self.sentences = {"train": sentences[:train_count], "eval": sentences[train_count:],
                          "all": sentences}[split]
        if not self.sentences:
            raise ValueError(f"the haystack's {split!r} split is empty: the text has {len(sentences)} "
                             f"sentence(s), 'train' is the first {TRAIN_FRACTION:.0%} of them and 'eval' the "
                             "rest; give a longer text")
        self._tokens = {}

    def tokens(self, encoding):
        """The sentences' token ids for this encoding, concatenated, and where each sentence ends.

        Returns ids (T,) int32 and ends (n+1,) int64: sentence i is ids[ends[i]:ends[i+1]], ends[0] = 0.
        """
        if encoding not in self._tokens:
            # a book's "<|endoftext|>" is text, never the special token
            pieces = [encoding.encode(sentence, disallowed_special=()) for sentence in self.sentences]
            ends = np.zeros(len(pieces) + 1, dtype=np.int64)
            np.cumsum([len(piece) for piece in pieces], out=ends[1:])
            ids = np.fromiter((i for piece in pieces for i in piece), dtype=np.int32, count=int(ends[-1]))
            self._tokens[encoding] = ids, ends
        return self._tokens[encoding]


# The classic filler is a haystack of its five sentences; wrapping around repeats them.
_REPEAT_HAYSTACK = Haystack(" " + REPEAT_FILLER, "all")


# ----------------------------------------------------------------------------------------------------------
# Samples

@dataclass(frozen=True)
class PasskeySample:
    prompt_ids: list[int]     # exactly `length` tokens, ending with the question
    answer: str               # the key, 5 digits, e.g. "68452"
    answer_ids: list[int]     # the tokens of " 68452", what the model should generate after the prompt
    needle_start: int         # index in prompt_ids of the needle's first token
    key_positions: list[int]  # indices in prompt_ids of the key's tokens, both times it appears in the needle
    question_start: int       # index in prompt_ids of the question's first token


@functools.cache
def prompt_overhead(encoding):
    """The most tokens the fixed parts of a sample take: intro, needle, question, answer and ANSWER_END.

    It is the smallest `length` that make_sample and training_example accept; the rest is filler.
    """
    longest_key = max(len(encoding.encode(ANSWER.format(key=key))) for key in range(KEY_LOW, KEY_HIGH))
    # every fixed piece once, the key three times: twice in the needle, once as the answer
    return sum(len(ids) for ids in _fixed_ids(encoding).values()) + 3 * longest_key


def make_sample(encoding, haystack, length, depth, seed, filler="prose"):
    """One evaluation sample: a prompt of exactly `length` tokens with the needle at `depth`.

    haystack: a Haystack, the filler when filler="prose" (may be None with filler="repeat").
    seed:     picks the key and where in the haystack the filler starts; the same seed at another length or
              depth gives the same key. Same (encoding, haystack, length, depth, seed, filler) -> same sample.
    """
    assert prompt_overhead(encoding) <= length and 0 <= depth <= 1 and seed >= 0, (length, depth, seed)
    haystack, key, start = _draw(np.random.default_rng(seed), haystack, filler)
    return _assemble(encoding, haystack, length, depth, key, start)


def training_example(encoding, haystack, length, rng, filler="prose", other_weight=0.05, min_depth=0.0):
    """One training sequence: prompt + answer + ANSWER_END, exactly length + 1 tokens, and its loss weights.

    rng: a numpy.random.Generator (its state is all the randomness, so a saved state resumes exactly); it draws
    the depth uniformly in [min_depth, 1), the key and the haystack start. A min_depth near 1 puts the needle
    close to the question: a curriculum over the distance the key must be carried.
    Returns ids (length + 1,) int64 and loss_weights (length,) float32: with inputs = ids[:-1] and
    targets = ids[1:], loss_weights[i] weighs the prediction of targets[i]. It is 1.0 where the target is the
    answer or the ANSWER_END that closes it (a model that goes on with more digits is wrong), and other_weight
    elsewhere: a language-model loss on every token of a long haystack drowns the few tokens of the key.
    """
    assert prompt_overhead(encoding) <= length, f"length {length} leaves no room for filler"
    depth = min_depth + (1 - min_depth) * rng.random()
    haystack, key, start = _draw(rng, haystack, filler)
    answer_end_ids = _fixed_ids(encoding)["answer_end"]
    answer_ids = encoding.encode(ANSWER.format(key=key))
    prompt_length = length + 1 - len(answer_ids) - len(answer_end_ids)
    sample = _assemble(encoding, haystack, prompt_length, depth, key, start)
    ids = np.array(sample.prompt_ids + sample.answer_ids + answer_end_ids, dtype=np.int64)   # (length+1,)
    loss_weights = np.full(length, other_weight, dtype=np.float32)                             # (length,)
    loss_weights[prompt_length - 1:] = 1.0    # targets[i] = ids[i+1], the answer starts at ids[prompt_length]
    return ids, loss_weights


def score(generated_text, answer):
    """Exact match: the first run of digits in the generated text is the answer."""
    digits = re.search(r"[0-9]+", generated_text)
    return digits is not None and digits.group() == answer


# ----------------------------------------------------------------------------------------------------------
# Assembly

@functools.cache
def _fixed_ids(encoding):
    """The fixed pieces of the format, tokenized once per encoding."""
    needle_head, needle_middle, needle_tail = NEEDLE.split(ANSWER)     # the key's tokens go between them
    return {"intro": encoding.encode(INTRO), "needle_head": encoding.encode(needle_head),
            "needle_middle": encoding.encode(needle_middle), "needle_tail": encoding.encode(needle_tail),
            "question": encoding.encode(QUESTION), "answer_end": encoding.encode(ANSWER_END)}


def _assemble(encoding, haystack, length, depth, key, start):
    """Intro, filler[:p], needle, filler[p:], question: exactly `length` tokens, filler from sentence `start`."""
    fixed = _fixed_ids(encoding)
    key_ids = encoding.encode(ANSWER.format(key=key))       # " 68452", also the answer
    needle = fixed["needle_head"] + key_ids + fixed["needle_middle"] + key_ids + fixed["needle_tail"]
    filler_length = length - len(fixed["intro"]) - len(needle) - len(fixed["question"])   # F

    # The filler is the token stream of sentences start, start+1, ... (wrapping around) from offset
    # ends[start], cut where the first sentence that reaches F tokens ends, and trimmed at the front to exactly
    # F tokens: it begins mid-sentence, like an excerpt, and ends at a sentence end before the question.
    # Offsets are "unrolled": sentence i of wrap w ends at w*T + ends[i].
    ids, ends = haystack.tokens(encoding)
    total, sentence_count = int(ends[-1]), len(ends) - 1                                 # T, n
    wraps, rest = divmod(int(ends[start]) + filler_length, total)
    last = wraps * sentence_count + int(np.searchsorted(ends, rest))   # unrolled index of the filler's end
    stop = wraps * total + int(ends[last - wraps * sentence_count])     # unrolled offset of that end
    begin = stop - filler_length
    filler = ids[np.arange(begin, stop) % total]                                        # (F,)

    # The needle goes at the start, at a sentence end, or at the end of the filler, whichever is nearest d*F.
    sentence_index = np.arange(start + 1, last + 1)
    sentence_ends = (sentence_index // sentence_count) * total + ends[sentence_index % sentence_count] - begin
    boundaries = np.concatenate([[0], sentence_ends[sentence_ends > 0]])
    needle_at = int(boundaries[np.argmin(np.abs(boundaries - depth * filler_length))])

    prompt = np.concatenate([fixed["intro"], filler[:needle_at], needle, filler[needle_at:], fixed["question"]])
    needle_start = len(fixed["intro"]) + needle_at
    first = needle_start + len(fixed["needle_head"])
    second = first + len(key_ids) + len(fixed["needle_middle"])
    return PasskeySample(prompt_ids=prompt.astype(np.int64).tolist(), answer=key, answer_ids=key_ids,
                         needle_start=needle_start,
                         key_positions=[*range(first, first + len(key_ids)), *range(second, second + len(key_ids))],
                         question_start=len(prompt) - len(fixed["question"]))


def _draw(rng, haystack, filler):
    """The filler's haystack and a sample's random choices: the key (5 digits), the sentence the filler starts at."""
    haystack = _REPEAT_HAYSTACK if filler == "repeat" else haystack
    return haystack, str(rng.integers(KEY_LOW, KEY_HIGH)), int(rng.integers(len(haystack.sentences)))
