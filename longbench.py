"""LongBench and LongBench-E (Bai et al., 2023): the official data, prompts, prediction and metrics.

The protocol, as LongBench's own scripts run it (and LongMamba and ReMamba report it):
  1. prompt = dataset2prompt[dataset].format(**sample), from LongBench's config files
  2. a prompt longer than max_length tokens keeps its first and last max_length//2 tokens (the middle goes)
  3. greedy decoding of at most dataset2maxlen[dataset] new tokens, stopping at EOS
  4. one jsonl line per sample, {"pred", "answers", "all_classes", "length"} (plus "_id", so that a killed
     run resumes); a sample scores the best metric value over its ground truths, a dataset
     round(100 * mean, 2), and LongBench-E also per bucket of `length` (the sample's word count).
There is no model code here: eval.py hands `predict` a `generate_fn` and a tokenizer's encode/decode.

The metrics are reimplemented without the `rouge` and `fuzzywuzzy` packages (tests compare them; rouge_score
and fuzz_ratio say where they can differ). The Chinese metrics need jieba: without it, their datasets are skipped.
"""

import datetime
import difflib
import glob
import json
import os
import re
import string
import time
from collections import Counter

import numpy as np

from mamba import atomic_write

try:
    import jieba
    jieba.setLogLevel(30)  # no "Building prefix dict" chatter on stderr at the first cut
except ImportError:
    jieba = None


# ----------------------------------------------------------------------------------------------------
# Datasets

DATASETS = (
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
    "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
    "multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh",  # Chinese
)
LONGBENCH_E_DATASETS = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news",
    "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)

# Few-shot datasets whose prediction the official scorer cuts to its first line (the model invents more examples).
FIRST_LINE_DATASETS = ("trec", "triviaqa", "samsum", "lsht")

SAMPLE_FIELDS = ("input", "context", "answers", "length", "all_classes", "_id")
CONFIG_FILES = ("dataset2prompt.json", "dataset2maxlen.json")


def load_config(config_dir):
    """LongBench's config/dataset2prompt.json and dataset2maxlen.json -> (dataset2prompt, dataset2maxlen)."""
    missing = [name for name in CONFIG_FILES if not os.path.isfile(os.path.join(config_dir, name))]
    if missing:
        raise FileNotFoundError(f"{config_dir} lacks {' and '.join(missing)}: copy them from the config/ folder of "
                                "the LongBench repository (github.com/THUDM/LongBench) or pass a folder with them")
    configs = []
    for name, value_type in zip(CONFIG_FILES, (str, int)):
        path = os.path.join(config_dir, name)
        with open(path, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(config, dict) or not all(isinstance(v, value_type) for v in config.values()):
            raise ValueError(f"{path} should map dataset names to {value_type.__name__} values")
        configs.append(config)
    return tuple(configs)


def load_samples(data_dir, dataset, e=False):
    """The samples of {data_dir}/{dataset}.jsonl ({dataset}_e.jsonl for LongBench-E), in file order."""
    assert dataset in (LONGBENCH_E_DATASETS if e else DATASETS), (dataset, e)
    path = os.path.join(data_dir, f"{dataset}_e.jsonl" if e else f"{dataset}.jsonl")
    samples, ids = [], set()
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: malformed JSON ({err.msg} at column {err.colno})") from None
            missing = [field for field in SAMPLE_FIELDS if not isinstance(sample, dict) or field not in sample]
            if missing:
                raise ValueError(f"{path}:{line_number}: missing field(s) {', '.join(missing)}")
            if not isinstance(sample["answers"], list) or not isinstance(sample["length"], int):
                raise ValueError(f"{path}:{line_number}: 'answers' should be a list and 'length' an integer")
            if sample["_id"] in ids:
                raise ValueError(f"{path}:{line_number}: _id {sample['_id']!r} appears twice")
            ids.add(sample["_id"])
            samples.append(sample)
    return samples


# ----------------------------------------------------------------------------------------------------
# Prompts

def build_prompt(dataset, sample, dataset2prompt):
    """The official prompt: the dataset's template filled with the sample's fields."""
    return dataset2prompt[dataset].format(**sample)


def truncate_middle(ids, max_length, encode, decode):
    """Keep the first and last max_length//2 tokens of a prompt longer than max_length. As the official pred.py,
    the halves are decoded, joined and encoded again (which can give a few tokens more or fewer)."""
    assert max_length >= 2, max_length
    if len(ids) <= max_length:
        return ids
    half = max_length // 2
    return encode(decode(ids[:half]) + decode(ids[len(ids) - half:]))


# ----------------------------------------------------------------------------------------------------
# Prediction files: append-only jsonl, one complete line per sample, so a kill loses at most the line
# being written. Under torchrun each rank appends to its own file, merged by rank 0 at the end.

def _prediction_paths(out_path):
    """out_path, then every {out_path}.rank{r} there is, whatever the world size of the run that left it."""
    pattern = re.compile(re.escape(os.path.basename(out_path)) + r"\.rank\d+$")
    ranks = sorted(p for p in glob.glob(glob.escape(out_path) + ".rank*") if pattern.fullmatch(os.path.basename(p)))
    return [out_path] + ranks


def _read_predictions(path, sample_ids=None, repair=False, fields=("pred",)):
    """Records of the complete lines of a prediction file (none when it does not exist), each with `fields`
    and an `_id` among sample_ids unless that is None. A last line without its newline was cut by a kill (maybe
    inside a UTF-8 character, hence bytes): it is dropped, with repair=True also from the file, so appending goes on."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.readlines()
    cut = bool(lines) and not lines[-1].endswith(b"\n")
    if cut:
        lines.pop()
    records = []
    for line_number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}:{line_number}: malformed prediction line ({err}); "
                             "fix or delete that line, the sample is then predicted again") from None
        missing = [field for field in fields if not isinstance(record, dict) or field not in record]
        if missing:
            raise ValueError(f"{path}:{line_number}: a prediction line is a JSON object with {', '.join(fields)}; "
                             f"missing {', '.join(missing)}")
        if sample_ids is not None and record.get("_id") not in sample_ids:
            raise ValueError(f"{path}:{line_number}: _id {record.get('_id')!r} is not among these samples (another "
                             "dataset or data directory?): move the file away or choose another output path")
        records.append(record)
    if cut and repair:
        atomic_write(path, b"".join(lines))
    return records


def predict(samples, dataset, generate_fn, encode, decode, out_path, max_length, dataset2prompt,
            dataset2maxlen, eos_token_id, rank=0, world_size=1, progress=print):
    """Predict the samples of one dataset, appending one official jsonl line per sample; returns how many
    new lines were written. encode: str -> list[int]; decode: list[int] -> str.

    generate_fn(prompt_ids, max_new_tokens, stop_ids, min_new_tokens) -> list[int], the new tokens of a greedy
    decode that stops after any of stop_ids (a trailing EOS is dropped here). As the official pred.py, samsum
    also stops at a newline and emits at least one token. Samples already in out_path or any {out_path}.rank*
    file are skipped, so a killed run resumes. Rank r of world_size handles samples i % world_size == r; with
    more than one rank it writes {out_path}.rank{r}, and after a barrier rank 0 calls merge_rank_files.
    """
    assert 0 <= rank < world_size, (rank, world_size)
    if dataset not in dataset2prompt or dataset not in dataset2maxlen:
        raise ValueError(f"the LongBench config has no prompt template or no generation length for {dataset!r}")
    stops = [eos_token_id] + ([encode("\n")[-1]] if dataset == "samsum" else [])
    own_path = out_path if world_size == 1 else f"{out_path}.rank{rank}"

    sample_ids = {sample["_id"] for sample in samples}
    done = set()
    for path in _prediction_paths(out_path):
        done.update(record["_id"] for record in _read_predictions(path, sample_ids, repair=path == own_path))
    todo = [s for i, s in enumerate(samples) if i % world_size == rank and s["_id"] not in done]
    mine = len(range(rank, len(samples), world_size))
    progress(f"{dataset}: rank {rank}: {mine - len(todo)} of {mine} samples already predicted, {len(todo)} to go")

    os.makedirs(os.path.dirname(os.path.abspath(own_path)), exist_ok=True)
    start = time.time()
    with open(own_path, "a", encoding="utf-8") as f:
        for count, sample in enumerate(todo, start=1):
            prompt = build_prompt(dataset, sample, dataset2prompt)
            prompt_ids = truncate_middle(encode(prompt), max_length, encode, decode)
            new_ids = list(generate_fn(prompt_ids, dataset2maxlen[dataset], stops, 1 if dataset == "samsum" else 0))
            if new_ids and new_ids[-1] == eos_token_id:
                new_ids = new_ids[:-1]
            record = {"pred": decode(new_ids), "answers": sample["answers"], "all_classes": sample["all_classes"],
                      "length": sample["length"], "_id": sample["_id"]}
            # one write per line, flushed and synced: a kill leaves at most one cut line, repaired on resume
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            rate = count / max(time.time() - start, 1e-9)
            progress(f"{dataset}: rank {rank}: {mine - len(todo) + count}/{mine} samples, "
                     f"{rate:.3f} samples/s, ETA {datetime.timedelta(seconds=int((len(todo) - count) / rate))}")
    return len(todo)


def merge_rank_files(out_path, samples):
    """Gather out_path and every {out_path}.rank* into out_path, one line per sample in the samples' order,
    then delete the rank files; returns the number of lines. Call it on rank 0 once every rank has returned
    from `predict`. A sample predicted twice (a resume under another world size) keeps its first line. While
    some sample has no prediction it raises, changing nothing: rerunning resumes."""
    paths = _prediction_paths(out_path)
    sample_ids = {sample["_id"] for sample in samples}
    lines = {}
    for path in paths:
        for record in _read_predictions(path, sample_ids):
            lines.setdefault(record["_id"], json.dumps(record, ensure_ascii=False) + "\n")
    missing = len(sample_ids) - len(lines)
    if missing:
        raise RuntimeError(f"{missing} of {len(sample_ids)} samples have no prediction in {', '.join(paths)}; "
                           "run the prediction again: it resumes")
    atomic_write(out_path, "".join(lines[sample["_id"]] for sample in samples))
    for path in paths[1:]:
        os.remove(path)
    return len(samples)


# ----------------------------------------------------------------------------------------------------
# Metrics: metric(prediction, ground_truth) -> float in [0, 1]; classification also takes all_classes.

def normalize_answer(text):
    """SQuAD normalisation: lower case, drop ASCII punctuation, drop the articles a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


# LongBench's list of Chinese punctuation, as it is (it has "》" but not "《").
CHINESE_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."


def normalize_zh_answer(text):
    """Chinese normalisation: lower case, drop ASCII and Chinese punctuation, drop all whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation and ch not in CHINESE_PUNCTUATION)
    return "".join(text.split())


def token_f1(prediction_tokens, truth_tokens):
    """F1 of the multiset overlap of two token lists."""
    same = sum((Counter(prediction_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction, ground_truth):
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _jieba_words(text):
    if jieba is None:
        raise RuntimeError("the Chinese LongBench metrics need jieba: pip install jieba")
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_score(prediction, ground_truth):
    """Token F1 over jieba words, each normalised, empty ones dropped."""
    prediction_tokens = [w for w in map(normalize_zh_answer, _jieba_words(prediction)) if w]
    truth_tokens = [w for w in map(normalize_zh_answer, _jieba_words(ground_truth)) if w]
    return token_f1(prediction_tokens, truth_tokens)


def _rouge_sentences(text):
    """The `rouge` package's tokenisation: sentences split on ".", each a list of words split on single
    spaces after collapsing whitespace. A piece of whitespace alone becomes the one word ""."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if len(piece) > 0]


def _lcs_words(x, y):
    """The words of the LCS of x and y that the `rouge` package picks among equally long ones."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    # walk back from the end, on a tie stepping back in y, as the package's recursion does
    words, i, j = [], len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_score(prediction, ground_truth):
    """ROUGE-L F as the `rouge` package (1.0.1, Rouge().get_scores(...)["rouge-l"]["f"]) computes it.

    Summary-level with set semantics: hits are the distinct words of the LCS of every (reference sentence,
    prediction sentence) pair; R = hits / distinct reference words, P = hits / distinct prediction words,
    F = 2PR / (P + R + 1e-8). Case is kept. An empty side raises in the package, which the official scorer scores 0.
    The package also raises (RecursionError: it rebuilds each LCS recursively) once a reference and a prediction
    sentence reach about 1,000 words together, which Chinese text (split on "." only) can; here they are scored.
    """
    prediction_sentences, reference_sentences = _rouge_sentences(prediction), _rouge_sentences(ground_truth)
    if not prediction_sentences or not reference_sentences:
        return 0.0
    hits = set()
    for reference_words in reference_sentences:
        for prediction_words in prediction_sentences:
            hits.update(_lcs_words(reference_words, prediction_words))
    recall = len(hits) / len({w for s in reference_sentences for w in s})
    precision = len(hits) / len({w for s in prediction_sentences for w in s})
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def rouge_zh_score(prediction, ground_truth):
    """ROUGE-L F over jieba words joined by spaces."""
    return rouge_score(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(ground_truth)))


def classification_score(prediction, ground_truth, all_classes):
    """1/(number of class names found in the prediction) when the right one is among them, else 0. Names found
    that are part of the right name (and not it) are discarded by the official loop, which removes from the list
    it iterates over: after each removal the next name is skipped, not checked."""
    if all_classes is None:
        raise ValueError("classification needs the dataset's all_classes, which these samples lack")
    found = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(found):
        if found[i] in ground_truth and found[i] != ground_truth:
            found.remove(found[i])  # the first equal name, as list.remove does; then one name is skipped
        i += 1
    return 1.0 / len(found) if ground_truth in found else 0.0


def count_score(prediction, ground_truth):
    """Fraction of the numbers (digit runs) in the prediction equal to the answer; 0 with none."""
    numbers = re.findall(r"\d+", prediction)
    return sum(number == str(ground_truth) for number in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction, ground_truth, pattern=r"Paragraph (\d+)"):
    """count_score against the paragraph number of the ground truth ("Paragraph 12")."""
    match = re.search(pattern, ground_truth)
    if match is None:
        raise ValueError(f"retrieval ground truth {ground_truth!r} does not match {pattern!r}")
    return count_score(prediction, match.group(1))


def retrieval_zh_score(prediction, ground_truth):
    return retrieval_score(prediction, ground_truth, r"段落(\d+)")


def fuzz_ratio(a, b):
    """fuzzywuzzy's fuzz.ratio without python-Levenshtein (with it, fuzzywuzzy uses that package's ratio):
    round(100 * difflib ratio), 100 when equal, 0 when either is empty (round() is Python's, half to even)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction, ground_truth):
    """fuzz.ratio/100 between the ground-truth line and the first predicted line that contains none of
    "`", "#", "//" anywhere (the official test: markdown fences and comments are skipped; "" if none)."""
    lines = prediction.lstrip("\n").split("\n")
    code_line = next((line for line in lines if "`" not in line and "#" not in line and "//" not in line), "")
    return fuzz_ratio(code_line, ground_truth) / 100


DATASET_METRIC = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score,
    "musique": qa_f1_score, "dureader": rouge_zh_score, "gov_report": rouge_score, "qmsum": rouge_score,
    "multi_news": rouge_score, "vcsum": rouge_zh_score, "trec": classification_score,
    "triviaqa": qa_f1_score, "samsum": rouge_score, "lsht": classification_score,
    "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score, "lcc": code_sim_score, "repobench-p": code_sim_score,
}


def skip_reason(dataset):
    """Why this dataset cannot be scored here (its metric needs jieba, which is missing), or None."""
    if jieba is None and DATASET_METRIC.get(dataset) in (qa_f1_zh_score, rouge_zh_score):
        return f"skipping {dataset}: its Chinese metric needs jieba (pip install jieba)"
    return None


# ----------------------------------------------------------------------------------------------------
# Scores

def sample_score(dataset, prediction, ground_truths, all_classes):
    """The best metric value over the ground truths (0 with none), after the first-line cut."""
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = DATASET_METRIC[dataset]
    extra = (all_classes,) if metric is classification_score else ()
    return max([metric(prediction, truth, *extra) for truth in ground_truths], default=0.0)


def score(dataset, predictions, answers, all_classes):
    """The official LongBench score of a dataset: round(100 * mean sample score, 2)."""
    assert predictions and len(answers) == len(predictions), (len(predictions), len(answers))
    total = 0.0  # summed in order, as the official scorer (not sum(), which compensates from Python 3.12)
    for prediction, ground_truths in zip(predictions, answers):
        total += sample_score(dataset, prediction, ground_truths, all_classes)
    return round(100 * total / len(predictions), 2)


def score_e(dataset, predictions, answers, lengths, all_classes):
    """LongBench-E: the official score per bucket of `length` (words: < 4000, < 8000, more); NaN for an empty
    bucket, as the official scorer. Means and rounding are numpy's, as in the official one."""
    assert predictions and len(answers) == len(lengths) == len(predictions), (len(predictions), len(answers))
    buckets = {"0-4k": [], "4-8k": [], "8k+": []}
    for prediction, ground_truths, length in zip(predictions, answers, lengths):
        bucket = "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"
        buckets[bucket].append(sample_score(dataset, prediction, ground_truths, all_classes))
    return {bucket: float(round(100 * np.mean(scores), 2)) if scores else float("nan")
            for bucket, scores in buckets.items()}


def score_file(pred_path, dataset, e=False):
    """Score a prediction jsonl: `score` (or `score_e` with e=True) of its lines. Like the official
    eval.py, all_classes comes from the last line (it is the same on every line of a dataset)."""
    records = _read_predictions(pred_path, fields=("pred", "answers", "all_classes") + (("length",) if e else ()))
    if not records:
        raise ValueError(f"{pred_path} holds no predictions")
    predictions, answers = [r["pred"] for r in records], [r["answers"] for r in records]
    all_classes = records[-1]["all_classes"]
    if e:
        return score_e(dataset, predictions, answers, [r["length"] for r in records], all_classes)
    return score(dataset, predictions, answers, all_classes)
