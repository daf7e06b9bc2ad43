"""LongBench: metrics on hand-computed cases, prompts and truncation on the fixture in tests/data/longbench/
(the official jsonl format), resumable prediction, scoring, error messages, and parity with the reference
packages (rouge, fuzzywuzzy, jieba) where they are installed."""

import json
import os
import random
import shutil
import warnings

import pytest

import longbench as lb

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "longbench")
TREC_CLASSES = ["Individual", "Mountain", "City", "Country", "Other location"]


# ---------------------------------------------------------------------------------------------------
# metrics, hand-computed

def test_qa_f1():
    assert lb.qa_f1_score("", "the Pile") == 0.0
    assert lb.qa_f1_score("The Pile.", "the Pile") == 1.0  # case, punctuation, article
    assert lb.qa_f1_score("An apple, the pear!", "apple pear") == 1.0
    assert lb.qa_f1_score("the theory", "theory") == 1.0  # "the" goes, "theory" keeps its "the"
    assert lb.qa_f1_score("U.S.A.", "usa") == 1.0
    assert lb.qa_f1_score("Pile corpus of text", "the Pile") == pytest.approx(0.4)  # P 1/4, R 1
    assert lb.qa_f1_score("48 layers", "48") == pytest.approx(2 / 3)  # P 1/2, R 1
    assert lb.qa_f1_score("48", "4 8") == 0.0  # numbers are whole tokens
    assert lb.qa_f1_score("no no", "no") == pytest.approx(2 / 3)  # multiset overlap 1: P 1/2, R 1


def test_several_ground_truths_take_the_best():
    assert lb.sample_score("qasper", "48 layers", ["48", "48 layers"], None) == 1.0
    assert lb.sample_score("qasper", "48 layers", ["48", "twelve"], None) == pytest.approx(2 / 3)
    assert lb.sample_score("qasper", "anything", [], None) == 0.0


def rouge_f(precision, recall):
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))  # the package's F, epsilon included


def test_rouge_l():
    assert lb.rouge_score("", "the cat sat") == 0.0
    assert lb.rouge_score("...", "the cat sat") == 0.0  # no sentence left: the package raises, scored 0
    assert lb.rouge_score("the cat sat", "") == 0.0
    assert lb.rouge_score("the cat sat", "the cat sat") == rouge_f(1.0, 1.0)
    # reference words {the, cat, sat}, prediction words {the, cat, sat, on, mat}: P 3/5, R 1
    assert lb.rouge_score("the cat sat on the mat", "the cat sat") == rouge_f(3 / 5, 1.0)
    # case is kept: only "cat" is shared
    assert lb.rouge_score("The cat", "the cat") == rouge_f(1 / 2, 1 / 2)
    # sentences split on ".": LCS(a b c, b a) is "b" (tie: the package steps back in the prediction;
    # "a" would give 0.8), LCS(a b c, b) is "b", union {b}: P 1/2 (prediction words {a, b}), R 1/3
    assert lb.rouge_score("b a. b", "a b c") == rouge_f(1 / 2, 1 / 3)
    # ... and with "c" the union is {b, c}: P 2/3, R 2/3
    assert lb.rouge_score("b a. c", "a b c") == rouge_f(2 / 3, 2 / 3)


def test_classification():
    assert lb.classification_score("City", "City", TREC_CLASSES) == 1.0
    assert lb.classification_score("City or Country", "City", TREC_CLASSES) == 0.5
    assert lb.classification_score("Mountain", "City", TREC_CLASSES) == 0.0
    assert lb.classification_score("", "City", TREC_CLASSES) == 0.0
    # "location" is part of the right name, so it is discarded
    assert lb.classification_score("Other location", "Other location", ["location", "Other location"]) == 1.0
    # the official loop removes from the list it walks: after dropping "location" it skips "Other",
    # which stays counted
    assert lb.classification_score("Other location", "Other location", ["location", "Other", "Other location"]) == 0.5
    with pytest.raises(ValueError, match="all_classes"):
        lb.classification_score("City", "City", None)


def test_first_line_cut():
    # trec keeps the first line only: "Country" on the next line does not count
    assert lb.sample_score("trec", "\nCity\nQuestion: Where is Peru?\nType: Country", ["City"], TREC_CLASSES) == 1.0
    assert lb.classification_score("City\nType: Country", "City", TREC_CLASSES) == 0.5


def test_retrieval_and_count():
    assert lb.retrieval_score("Paragraph 2", "Paragraph 2") == 1.0
    assert lb.retrieval_score("Paragraph 2, not Paragraph 12", "Paragraph 2") == 0.5
    assert lb.retrieval_score("", "Paragraph 2") == 0.0
    assert lb.retrieval_score("The answer is 3", "Paragraph 2") == 0.0
    with pytest.raises(ValueError, match="Paragraph"):
        lb.retrieval_score("2", "the second one")
    assert lb.count_score("2", "2") == 1.0
    assert lb.count_score("There are 2 unique paragraphs out of 3", "2") == 0.5
    assert lb.count_score("22", "2") == 0.0  # digit runs are whole numbers
    assert lb.count_score("two", "2") == 0.0
    assert lb.retrieval_zh_score("段落2", "段落2") == 1.0


def test_code_sim():
    assert lb.fuzz_ratio("abcd", "abce") == 75  # difflib: 2 * 3 matches / 8 characters
    assert lb.fuzz_ratio("", "") == 100
    assert lb.fuzz_ratio("", "a") == 0
    truth = "    return total"
    assert lb.code_sim_score("```python\n    return total\n```", truth) == 1.0
    assert lb.code_sim_score("\n\n# the sum\n    return total", truth) == 1.0
    # a line containing # or // anywhere is skipped, not only one starting with it
    assert lb.code_sim_score("    return total  # done\nx = 1", truth) == lb.fuzz_ratio("x = 1", truth) / 100
    assert lb.code_sim_score("    return total // 2\n    return total", truth) == 1.0
    assert lb.code_sim_score("# only\n// comments", truth) == 0.0
    assert lb.code_sim_score("", truth) == 0.0


@pytest.mark.skipif(lb.jieba is None, reason="jieba not installed")
def test_chinese_metrics():
    assert lb.qa_f1_zh_score("十六", "十六") == 1.0
    assert lb.qa_f1_zh_score("十六。", "十六") == 1.0  # Chinese punctuation dropped
    assert lb.qa_f1_zh_score("", "十六") == 0.0
    assert lb.rouge_zh_score("", "会议讨论了预算") == 0.0
    assert lb.rouge_zh_score("会议讨论了预算", "会议讨论了预算") == pytest.approx(1.0, abs=1e-7)


def test_chinese_skipped_without_jieba(monkeypatch):
    monkeypatch.setattr(lb, "jieba", None)
    assert "jieba" in lb.skip_reason("multifieldqa_zh")
    assert "jieba" in lb.skip_reason("vcsum")
    assert lb.skip_reason("lsht") is None and lb.skip_reason("passage_retrieval_zh") is None
    assert lb.skip_reason("qasper") is None
    with pytest.raises(RuntimeError, match="pip install jieba"):
        lb.score("dureader", ["预算"], [["预算"]], None)


def test_score_and_buckets():
    assert lb.score("qasper", ["the Pile", "yes"], [["Pile"], ["no"]], None) == 50.0
    assert lb.score("qasper", ["48 layers"], [["48"]], None) == 66.67
    buckets = lb.score_e("qasper", ["16", "GELU", "one A100 GPU", ""], [["16"], ["SiLU"], ["one A100 GPU"], ["2048"]],
                         [1200, 3999, 4000, 8000], None)
    assert buckets == {"0-4k": 50.0, "4-8k": 100.0, "8k+": 0.0}
    nan = pytest.approx(float("nan"), nan_ok=True)  # an empty bucket
    assert lb.score_e("qasper", ["16"], [["16"]], [7999], None) == {"0-4k": nan, "4-8k": 100.0, "8k+": nan}
    with pytest.raises(AssertionError):  # no predictions
        lb.score("qasper", [], [], None)
    with pytest.raises(AssertionError):  # fewer answer lists than predictions
        lb.score("qasper", ["a", "b"], [["a"]], None)


# ---------------------------------------------------------------------------------------------------
# data, config, prompts

def test_load_config_and_samples():
    prompts, maxlen = lb.load_config(DATA)
    assert set(lb.DATASETS) <= set(prompts) and set(lb.DATASETS) <= set(maxlen)
    assert maxlen["gov_report"] == 512 and maxlen["trec"] == 64
    samples = lb.load_samples(DATA, "qasper")
    assert [s["_id"] for s in samples] == ["fixture-qasper-0", "fixture-qasper-1", "fixture-qasper-2"]
    assert samples[0]["answers"] == ["the Pile", "Pile corpus"]
    assert [s["length"] for s in lb.load_samples(DATA, "qasper", e=True)] == [1200, 3999, 5000, 9000]


def test_build_prompt_on_fixture():
    prompts, _ = lb.load_config(DATA)
    trec = lb.load_samples(DATA, "trec")[0]
    assert lb.build_prompt("trec", trec, prompts) == (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        + trec["context"] + "\n" + trec["input"])
    repo = lb.load_samples(DATA, "repobench-p")[0]
    assert lb.build_prompt("repobench-p", repo, prompts) == (
        "Please complete the code given below. \n# path: utils.py\ndef join(a, b):\nimport os\nNext line of code:\n")


def test_truncate_middle():
    ids = list(range(10))
    chars = lambda ids: "".join(map(str, ids))  # noqa: E731  (one character per id: the re-encoding keeps them)
    digits = lambda text: [int(c) for c in text]  # noqa: E731
    assert lb.truncate_middle(ids, 10, digits, chars) == ids
    assert lb.truncate_middle(ids, 20, digits, chars) == ids
    assert lb.truncate_middle(ids, 4, digits, chars) == [0, 1, 8, 9]
    assert lb.truncate_middle(ids, 5, digits, chars) == [0, 1, 8, 9]  # odd: 2 * (5 // 2), as the official int(5/2)
    assert lb.truncate_middle(ids, 2, digits, chars) == [0, 9]
    # the official form: both halves decoded, joined and encoded again (here the join merges "ab" + "cd")
    words = {0: "ab", 1: "cd", 2: "abcd", 9: "x"}
    enc = lambda text: [2] if text == "abcd" else [k for k, v in words.items() if v == text]  # noqa: E731
    assert lb.truncate_middle([0, 5, 6, 1], 2, enc, lambda ids: "".join(words[i] for i in ids)) == [2]


def test_error_messages(tmp_path):
    lines = open(os.path.join(DATA, "trec.jsonl"), encoding="utf-8").read().splitlines()
    (tmp_path / "trec.jsonl").write_text(lines[0] + "\n" + lines[1][:-5] + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"trec\.jsonl:2: malformed JSON"):
        lb.load_samples(str(tmp_path), "trec")
    (tmp_path / "trec.jsonl").write_text(lines[0] + "\n" + lines[0] + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"trec\.jsonl:2: _id 'fixture-trec-0' appears twice"):
        lb.load_samples(str(tmp_path), "trec")
    record = json.loads(lines[0])
    del record["answers"]
    (tmp_path / "trec.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"trec\.jsonl:1: missing field\(s\) answers"):
        lb.load_samples(str(tmp_path), "trec")
    with pytest.raises(FileNotFoundError, match="dataset2prompt.json and dataset2maxlen.json"):
        lb.load_config(str(tmp_path))
    shutil.copy(os.path.join(DATA, "dataset2prompt.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match="lacks dataset2maxlen.json"):
        lb.load_config(str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# prediction: resumable, rank-split, scored like the official files

EOS = 0


def encode(text):
    return list(text.encode("utf-8"))


def decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


class FakeModel:
    """generate_fn stand-in: echoes the last prompt bytes reversed, then EOS; can die after n calls."""

    def __init__(self, die_after=None):
        self.prompts, self.die_after = [], die_after

    def __call__(self, prompt_ids, max_new_tokens, stop_ids, min_new_tokens):
        if self.die_after is not None and len(self.prompts) == self.die_after:
            raise KeyboardInterrupt("killed")
        self.prompts.append(prompt_ids)
        self.stops = (stop_ids, min_new_tokens)
        return prompt_ids[::-1][:max_new_tokens] + [stop_ids[0]]


def run(samples, out_path, model, dataset="qasper", max_length=120, **kwargs):
    prompts, maxlen = lb.load_config(DATA)
    lines = []
    written = lb.predict(samples, dataset, model, encode, decode, str(out_path), max_length, prompts, maxlen,
                         EOS, progress=lines.append, **kwargs)
    return written, lines


def test_predict_writes_official_lines_with_truncation(tmp_path):
    samples = lb.load_samples(DATA, "qasper")
    prompts, maxlen = lb.load_config(DATA)
    model = FakeModel()
    written, lines = run(samples, tmp_path / "qasper.jsonl", model)
    assert written == 3
    full = encode(lb.build_prompt("qasper", samples[0], prompts))
    assert len(full) > 120 and model.prompts[0] == full[:60] + full[-60:]
    records = [json.loads(line) for line in open(tmp_path / "qasper.jsonl", encoding="utf-8")]
    assert [list(r) for r in records] == [["pred", "answers", "all_classes", "length", "_id"]] * 3
    assert records[0]["pred"] == decode(model.prompts[0][::-1][:maxlen["qasper"]])  # EOS dropped
    assert records[2]["answers"] == ["48", "48 layers"] and records[2]["length"] == samples[2]["length"]
    assert "samples/s" in lines[-1] and "ETA" in lines[-1] and "3/3" in lines[-1]


def test_resume_after_kill_gives_the_same_file(tmp_path):
    samples = lb.load_samples(DATA, "qasper")
    run(samples, tmp_path / "whole.jsonl", FakeModel())
    out = tmp_path / "killed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(samples, out, FakeModel(die_after=2))
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    with open(out, "ab") as f:  # the kill also cut the next line mid-write, inside a UTF-8 character
        f.write('{"pred": "half a line 预'.encode("utf-8")[:-1])
    model = FakeModel()
    written, lines = run(samples, out, model)
    assert written == 1 and len(model.prompts) == 1
    assert "2 of 3 samples already predicted" in lines[0]
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert run(samples, out, FakeModel(die_after=0))[0] == 0  # nothing left: nothing generated
    assert lb.merge_rank_files(str(out), samples) == 3
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_ranks_split_resume_and_merge(tmp_path):
    samples = lb.load_samples(DATA, "qasper", e=True)
    run(samples, tmp_path / "whole.jsonl", FakeModel())
    out = tmp_path / "split.jsonl"
    rank0 = FakeModel(die_after=1)
    with pytest.raises(KeyboardInterrupt):
        run(samples, out, rank0, rank=0, world_size=2)
    rank1 = FakeModel()
    assert run(samples, out, rank1, rank=1, world_size=2)[0] == 2  # samples 1 and 3
    with pytest.raises(RuntimeError, match="1 of 4 samples have no prediction"):
        lb.merge_rank_files(str(out), samples)
    assert run(samples, out, FakeModel(), rank=0, world_size=2)[0] == 1
    assert lb.merge_rank_files(str(out), samples) == 4
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["split.jsonl", "whole.jsonl"]
    # a resume with one process skips what the ranks did
    assert run(samples, out, FakeModel(die_after=0))[0] == 0


def test_predict_refuses_a_file_of_other_samples(tmp_path):
    out = tmp_path / "pred.jsonl"
    run(lb.load_samples(DATA, "trec"), out, FakeModel(), dataset="trec")
    with pytest.raises(ValueError, match="not among these samples"):
        run(lb.load_samples(DATA, "qasper"), out, FakeModel())


def test_predict_refuses_a_dataset_missing_from_the_config(tmp_path):
    _, maxlen = lb.load_config(DATA)
    with pytest.raises(ValueError, match="no prompt template or no generation length for 'qasper'"):
        lb.predict(lb.load_samples(DATA, "qasper"), "qasper", FakeModel(), encode, decode, str(tmp_path / "p.jsonl"),
                   120, {}, maxlen, EOS)


def test_score_file_matches_score(tmp_path):
    for dataset, e in [("qasper", False), ("trec", False), ("lcc", False), ("gov_report", False),
                       ("passage_count", False), ("passage_retrieval_en", False), ("qasper", True)]:
        samples = lb.load_samples(DATA, dataset, e=e)
        out = tmp_path / f"{dataset}{'_e' if e else ''}.jsonl"
        run(samples, out, FakeModel(), dataset=dataset)
        records = [json.loads(line) for line in open(out, encoding="utf-8")]
        predictions, answers = [r["pred"] for r in records], [r["answers"] for r in records]
        classes = samples[0]["all_classes"]
        if e:
            lengths = [r["length"] for r in records]
            expected = lb.score_e(dataset, predictions, answers, lengths, classes)
            assert lb.score_file(str(out), dataset, e=True) == expected
        else:
            assert lb.score_file(str(out), dataset) == lb.score(dataset, predictions, answers, classes)
    # exact answers score 100
    exact = tmp_path / "exact.jsonl"
    exact.write_text("".join(json.dumps({"pred": s["answers"][0], "answers": s["answers"], "all_classes": None,
                                         "length": s["length"]}) + "\n" for s in lb.load_samples(DATA, "qasper")))
    assert lb.score_file(str(exact), "qasper") == 100.0
    lacking = tmp_path / "lacking.jsonl"
    lacking.write_text('{"pred": "x", "answers": ["x"]}\n')
    with pytest.raises(ValueError, match=r"lacking\.jsonl:1: .*; missing all_classes, length"):
        lb.score_file(str(lacking), "qasper", e=True)
    exact.write_text(exact.read_text() + '{"pred": "x", "answers": ["x"], "all_classes": nul}\n')
    with pytest.raises(ValueError, match=r"exact\.jsonl:4: malformed prediction line"):
        lb.score_file(str(exact), "qasper")
    exact.write_bytes(exact.read_bytes().replace(b'"x", "answers"', b'"\xe9", "answers"'))
    with pytest.raises(ValueError, match=r"exact\.jsonl:4: malformed prediction line \('utf-8' codec"):
        lb.score_file(str(exact), "qasper")


# ---------------------------------------------------------------------------------------------------
# parity with the reference packages

def _random_text(rng, words, pieces):
    parts = []
    for _ in range(rng.randint(0, pieces)):
        r = rng.random()
        parts.append(rng.choice(words) if r < 0.7 else rng.choice([".", ". ", " .", ",", "  ", "\n", " \t", "..."]))
        parts.append(" " if rng.random() < 0.8 else "")
    return "".join(parts)


WORDS = ["the", "The", "cat", "cat.", "sat", "on", "mat", "a", "dog", "ran", "2020", "4", "percent", "GAO",
         "report", "budget,", "(it)", "rose"]
EDGE_TEXTS = ["", ".", " ", "a", "a.b", "...", " . ", "a. .b", "a  b", "\n", "a\nb. c"]


def official_rouge(rouge_module, prediction, ground_truth):
    """LongBench's rouge_score: the package's rouge-l F, 0 when the package raises."""
    try:
        return rouge_module.Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]
    except Exception:
        return 0.0


def test_rouge_parity_with_the_rouge_package():
    rouge = pytest.importorskip("rouge")
    rng = random.Random(0)
    pairs = [(a, b) for a in EDGE_TEXTS for b in EDGE_TEXTS]
    pairs += [(_random_text(rng, WORDS, 40), _random_text(rng, WORDS, 40)) for _ in range(1500)]
    diffs = [abs(lb.rouge_score(p, g) - official_rouge(rouge, p, g)) for p, g in pairs]
    assert max(diffs) == 0.0, f"{sum(d > 0 for d in diffs)} of {len(pairs)} pairs differ, max {max(diffs)}"


def test_rouge_documented_difference_on_very_long_sentences():
    rouge = pytest.importorskip("rouge")
    text = " ".join(f"w{i}" for i in range(1000))  # one 1000-word sentence
    assert official_rouge(rouge, text, text) == 0.0  # the package's recursion gives up
    assert lb.rouge_score(text, text) == pytest.approx(1.0, abs=1e-7)


def test_fuzz_ratio_parity_with_fuzzywuzzy():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "install python-Levenshtein": its absence is the point
        fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    rng = random.Random(1)
    alphabet = "abc xyz_()=.+#\t"
    strings = EDGE_TEXTS + ["    return total", "return total", "    return os.path.join(a, b)"]
    strings += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(300)]
    pairs = [(rng.choice(strings), rng.choice(strings)) for _ in range(3000)]
    differing = [(a, b) for a, b in pairs if lb.fuzz_ratio(a, b) != fuzz.ratio(a, b)]
    assert not differing, f"{len(differing)} of {len(pairs)} pairs differ, e.g. {differing[0]}"


def test_chinese_parity_with_jieba_and_rouge():
    rouge = pytest.importorskip("rouge")
    if lb.jieba is None:
        pytest.skip("jieba not installed")
    texts = ["会议讨论了明年的预算。", "预算增加了百分之四", "", "小组决定推迟发布，并要求更多测试。",
             "The budget rose. 预算增加", "《报告》指出：预算增加了。"]
    for p in texts:
        for g in texts:
            joined = [" ".join(lb.jieba.cut(t, cut_all=False)) for t in (p, g)]
            assert lb.rouge_zh_score(p, g) == official_rouge(rouge, *joined)


def test_samsum_stops_at_a_newline_and_emits_at_least_one_token(tmp_path):
    model = FakeModel()
    run(lb.load_samples(DATA, "qasper"), tmp_path / "qasper.jsonl", model)
    assert model.stops == ([EOS], 0)
    samsum = [dict(s, _id=f"samsum-{i}") for i, s in enumerate(lb.load_samples(DATA, "qasper"))]
    run(samsum, tmp_path / "samsum.jsonl", model, dataset="samsum")
    assert model.stops == ([EOS, encode("\n")[-1]], 1)
