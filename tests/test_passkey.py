import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken

import passkey
from tokenizer import GPT2_PATTERN, byte_encoding

BOOK = Path(__file__).resolve().parent.parent / "data" / "war_and_peace.txt"
BYTES = byte_encoding()


@pytest.fixture(scope="module")
def book():
    return BOOK.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def haystack(book):
    return passkey.Haystack(book, "eval")


def needle_text(answer):
    return passkey.NEEDLE.format(key=answer)


def needle_end(sample):
    return sample.needle_start + len(BYTES.encode(needle_text(sample.answer)))


def filler_ids(sample):
    """The filler tokens before and after the needle."""
    intro = len(BYTES.encode(passkey.INTRO))
    question = len(BYTES.encode(passkey.QUESTION))
    return sample.prompt_ids[intro:sample.needle_start], sample.prompt_ids[needle_end(sample):-question]


def test_haystack_splits_partition_the_sentences(book):
    everything = passkey.Haystack(book, "all")
    train, held_out = passkey.Haystack(book, "train"), passkey.Haystack(book, "eval")
    assert train.sentences + held_out.sentences == everything.sentences
    assert len(held_out.sentences) == len(everything.sentences) - int(0.9 * len(everything.sentences))
    assert "".join(everything.sentences) == "\n" + book.strip()     # cutting into sentences loses nothing
    assert all(s[:1].isspace() and not s.isspace() for s in everything.sentences)
    assert max(len(s) for s in everything.sentences) < 2000         # sentences, not paragraphs or chapters


def test_same_arguments_same_sample(haystack):
    a = passkey.make_sample(BYTES, haystack, 5000, 0.3, seed=7)
    b = passkey.make_sample(BYTES, haystack, 5000, 0.3, seed=7)
    assert a == b
    others = [passkey.make_sample(BYTES, haystack, 5000, 0.3, seed=s) for s in range(8, 12)]
    assert all(o.prompt_ids != a.prompt_ids for o in others)
    assert len({o.answer for o in others}) > 1
    assert passkey.make_sample(BYTES, haystack, 3000, 0.9, seed=7).answer == a.answer   # the seed picks the key


@pytest.mark.parametrize("filler", ["prose", "repeat"])
@pytest.mark.parametrize("length", [256, 257, 1000, 4096, 100_000])
def test_prompt_has_exactly_the_asked_length(haystack, filler, length):
    sample = passkey.make_sample(BYTES, haystack, length, 0.5, seed=length, filler=filler)
    assert len(sample.prompt_ids) == length
    assert BYTES.decode(sample.prompt_ids).endswith(passkey.QUESTION)


def test_answer_is_the_key_of_the_needle(haystack):
    for seed in range(20):
        sample = passkey.make_sample(BYTES, haystack, 2000, seed / 19, seed)
        assert re.fullmatch(r"[1-9][0-9]{4}", sample.answer)
        assert BYTES.decode(sample.answer_ids) == " " + sample.answer
        text = BYTES.decode(sample.prompt_ids)
        assert text.count(needle_text(sample.answer)) == 1
        at_needle = BYTES.decode(sample.prompt_ids[sample.needle_start:needle_end(sample)])
        assert at_needle == needle_text(sample.answer)


def test_needle_depth(haystack):
    longest_sentence = max(len(BYTES.encode(s)) for s in haystack.sentences)
    for seed in range(10):
        start = passkey.make_sample(BYTES, haystack, 20_000, 0.0, seed)
        before, _ = filler_ids(start)
        assert before == []                                        # right after the intro

        end = passkey.make_sample(BYTES, haystack, 20_000, 1.0, seed)
        _, after = filler_ids(end)
        assert after == []                                         # right before the question

        middle = passkey.make_sample(BYTES, haystack, 20_000, 0.5, seed)
        before, after = filler_ids(middle)
        assert abs(len(before) - 0.5 * (len(before) + len(after))) <= longest_sentence / 2
        after_text = BYTES.decode(after)
        assert any(after_text.startswith(s) for s in haystack.sentences)   # between two sentences


def test_repeat_filler_is_the_classic_sentences():
    sample = passkey.make_sample(BYTES, None, 3000, 0.25, seed=1, filler="repeat")
    before, after = filler_ids(sample)
    classic = " " + passkey.REPEAT_FILLER
    cycle = classic * (3000 // len(classic) + 2)
    before_text, after_text = BYTES.decode(before), BYTES.decode(after)
    assert before_text in cycle and after_text in cycle
    assert any(after_text.startswith(s) for s in re.findall(r" [^.]+\.", classic))   # between two sentences


def test_concatenated_pieces_are_the_tokenization_of_the_text(haystack):
    # a tokenizer with merges, so that piece boundaries could matter
    ranks = {bytes([i]): i for i in range(256)}
    for merge in [b" t", b"th", b" th", b"he", b" the", b"in", b"an", b"\n\n", b"68", b" 6", b"is", b" is", b"ss"]:
        ranks[merge] = len(ranks)
    merged = tiktoken.Encoding(name="merged", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for seed in range(10):
        sample = passkey.make_sample(merged, haystack, 1500, seed / 9, seed)
        from_needle = sample.prompt_ids[sample.needle_start:]
        assert merged.encode(merged.decode(from_needle)) == from_needle


def test_score():
    assert passkey.score(" 68452", "68452")
    assert passkey.score(" 68452. Remember it.", "68452")
    assert passkey.score("is 68452 and 11111", "68452")
    assert not passkey.score(" 684521", "68452")
    assert not passkey.score(" 6845", "68452")
    assert not passkey.score(" 68 452", "68452")
    assert not passkey.score(" 11111 68452", "68452")
    assert not passkey.score("", "68452")
    assert not passkey.score(" the pass key", "68452")


def test_training_example(book):
    train = passkey.Haystack(book, "train")
    rng = np.random.default_rng(0)
    needle_positions = []
    for _ in range(20):
        ids, weights = passkey.training_example(BYTES, train, 512, rng)
        assert ids.shape == (513,) and weights.shape == (512,)
        text = BYTES.decode(ids.tolist())
        answer = re.search(r"The pass key is ([0-9]{5})\.", text).group(1)
        assert text.endswith(passkey.QUESTION + " " + answer + ".")
        answer_and_end = len(BYTES.encode(" " + answer + "."))
        assert np.all(weights[-answer_and_end:] == 1.0)              # the targets ids[-answer_and_end:]
        assert np.all(weights[:-answer_and_end] == np.float32(0.05))
        needle_positions.append(text.index("The pass key is") / len(text))
    assert min(needle_positions) < 0.4 and max(needle_positions) > 0.6   # the depth is random

    a = passkey.training_example(BYTES, train, 300, np.random.default_rng(5), filler="repeat", other_weight=0.0)
    b = passkey.training_example(BYTES, train, 300, np.random.default_rng(5), filler="repeat", other_weight=0.0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[1].sum() == len(BYTES.encode(" 12345."))


def test_prompt_overhead_is_the_shortest_length():
    overhead = passkey.prompt_overhead(BYTES)
    fixed = passkey.INTRO + needle_text("12345") + passkey.QUESTION + " 12345."
    assert overhead == len(BYTES.encode(fixed))
    sample = passkey.make_sample(BYTES, None, overhead, 0.5, seed=0, filler="repeat")
    assert len(sample.prompt_ids) == overhead
    ids, _ = passkey.training_example(BYTES, None, overhead, np.random.default_rng(0), filler="repeat")
    assert len(ids) == overhead + 1


def test_million_token_sample_is_fast(book):
    began = time.perf_counter()
    held_out = passkey.Haystack(book, "eval")                       # includes tokenizing the haystack once
    sample = passkey.make_sample(BYTES, held_out, 1_000_000, 0.5, seed=0)
    seconds = time.perf_counter() - began
    print(f"1M-token passkey sample, haystack tokenized included: {seconds:.2f} s")
    assert len(sample.prompt_ids) == 1_000_000
    assert seconds < 10


def test_bad_inputs(book, haystack):
    overhead = passkey.prompt_overhead(BYTES)
    with pytest.raises(AssertionError):
        passkey.make_sample(BYTES, haystack, overhead - 1, 0.5, seed=0)
    with pytest.raises(AssertionError):
        passkey.training_example(BYTES, haystack, 10, np.random.default_rng(0))
    for depth in [-0.1, 1.5, math.nan]:
        with pytest.raises(AssertionError):
            passkey.make_sample(BYTES, haystack, 1000, depth, seed=0)
    # a haystack is read from a user's file: its problems get a clear message
    with pytest.raises(ValueError, match="split is empty"):
        passkey.Haystack("One sentence only.", "train")
    with pytest.raises(ValueError, match="split is empty"):
        passkey.Haystack(" \n\n ", "all")
