"""eval.py end to end on a tiny checkpoint: tables, result files, pictures, resuming, one-line errors."""
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import eval as evaluate
import tokenizer
from mamba import Mamba, MambaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "war_and_peace.txt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    encoding = tokenizer.load_tiktoken(os.path.join(ROOT, "data", "bpe2048.tiktoken"))
    torch.manual_seed(0)
    model = Mamba(MambaConfig(d_model=32, n_layer=2, vocab_size=encoding.n_vocab, d_state=8))
    model.save_pretrained(directory, encoding)
    json.dump({"L_train": 128}, open(directory / "train_info.json", "w"))
    from remamba import ReMamba
    ReMamba(model).save(str(directory / "remamba.pt"))
    return str(directory)


def run(checkpoint, tmp_path, *args):
    evaluate.main(["--model", checkpoint, "--data", DATA, "--out-dir", str(tmp_path), "--calibration-windows", "4",
                   "--device", "cpu"] + list(args))


def test_passkey_all_methods_write_results(checkpoint, tmp_path, capsys):
    run(checkpoint, tmp_path, "--method", "longmamba,decimamba,remamba", "--lengths", "1x,256", "--depths", "0,1",
        "--samples", "2")
    out = capsys.readouterr().out
    for m in evaluate.METHODS:
        assert f"{m}: passkey accuracy (%)" in out
        result = json.load(open(tmp_path / f"passkey_{m}.json"))
        assert result["method"] == m and result["lengths"] == [128, 256] and result["depths"] == [0.0, 1.0]
        assert result["samples"] == 2 and result["L_train"] == 128 and "0-1" in result["units"]
        assert set(result["accuracy"]) == {"128", "256"} and set(result["accuracy"]["256"]) == {"0.0", "1.0"}
        for key in ("command", "commit", "device", "model", "settings", "haystack", "split", "seed"):
            assert key in result
    assert json.load(open(tmp_path / "passkey_longmamba.json"))["settings"]["b"] == evaluate.LONGMAMBA["b"]
    assert json.load(open(tmp_path / "passkey_decimamba.json"))["settings"]["layers"] == [1]
    selection = json.load(open(tmp_path / "passkey_remamba.json"))["mechanism"]
    assert set(selection["256"]) == {"needle_in_region", "key_token_kept", "correct_when_in_region", "samples"}
    decimated = json.load(open(tmp_path / "passkey_decimamba.json"))["mechanism"]["256"]
    assert decimated["samples"] == 4 and decimated["question_survived"] <= 4
    assert "LongMamba calibration" in out and "global channels" in out
    assert os.path.isfile(os.path.join(checkpoint, evaluate.CALIBRATION_FILE))
    pytest.importorskip("matplotlib")
    assert os.path.getsize(tmp_path / "passkey_vanilla_longmamba_decimamba_remamba.png") > 1000


def test_a_length_or_depth_given_twice_is_evaluated_once(checkpoint, tmp_path, capsys):
    run(checkpoint, tmp_path, "--lengths", "1x,128", "--depths", "0,0.0", "--samples", "1")
    result = json.load(open(tmp_path / "passkey_vanilla.json"))
    assert result["lengths"] == [128] and result["depths"] == [0.0]
    assert capsys.readouterr().out.count("\n     128 ") == 1          # one table row


def test_same_samples_give_the_same_vanilla_table(checkpoint, tmp_path):
    args = ["--lengths", "128", "--depths", "0.5", "--samples", "3"]
    run(checkpoint, tmp_path / "a", *args)
    run(checkpoint, tmp_path / "b", *args, "--method", "decimamba", "--tag", "_again")
    a = json.load(open(tmp_path / "a" / "passkey_vanilla.json"))["accuracy"]
    b = json.load(open(tmp_path / "b" / "passkey_vanilla_again.json"))["accuracy"]
    assert a == b


def test_an_interrupted_run_resumes_with_the_same_table(checkpoint, tmp_path, monkeypatch, capsys):
    args = ["--method", "longmamba", "--lengths", "128,300", "--depths", "0,0.5,1", "--samples", "2"]
    run(checkpoint, tmp_path / "straight", *args)
    calls, real = [], evaluate.generate

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(evaluate, "generate", interrupted)
    with pytest.raises(SystemExit, match="interrupted; what was finished is kept in"):
        run(checkpoint, tmp_path / "resumed", *args)
    monkeypatch.setattr(evaluate, "generate", real)
    run(checkpoint, tmp_path / "resumed", *args)
    assert "3 of 12 cells already done" in capsys.readouterr().out
    for m in ("vanilla", "longmamba"):
        assert json.load(open(tmp_path / "straight" / f"passkey_{m}.json"))["accuracy"] == \
            json.load(open(tmp_path / "resumed" / f"passkey_{m}.json"))["accuracy"]
    # other settings never reuse those cells
    run(checkpoint, tmp_path / "resumed", *args, "--b", "3")
    assert "already done" not in capsys.readouterr().out.split("longmamba_b3.0")[1]


def test_report_of_runs_with_other_depths(tmp_path, capsys):
    for label, depths in (("vanilla", [0.0, 1.0]), ("longmamba", [0.5])):
        json.dump({"lengths": [128], "depths": depths, "L_train": 128, "model": "m", "samples": 1, "split": "eval",
                   "seed": 0, "accuracy": {"128": {str(d): 1.0 for d in depths}}},
                  open(tmp_path / f"passkey_{label}.json", "w"))
    evaluate.main(["--report", str(tmp_path)])
    assert "| vanilla | 100 |" in capsys.readouterr().out


def test_a_cell_cut_by_a_kill_is_redone_once(checkpoint, tmp_path, capsys):
    args = ["--lengths", "128", "--depths", "0,1", "--samples", "2"]
    run(checkpoint, tmp_path, *args)
    [cells] = (tmp_path / "cells").iterdir()
    cells.write_text(cells.read_text()[:-5])                       # the last record lost its end
    run(checkpoint, tmp_path, *args)
    assert "3 of 4 cells already done" in capsys.readouterr().out
    run(checkpoint, tmp_path, *args)
    assert "4 of 4 cells already done" in capsys.readouterr().out


def test_progress_counts_only_the_work_of_this_run(checkpoint, tmp_path, monkeypatch, capsys):
    # a clock that advances 1 s per 1,000 tokens prefilled: every rate printed must read 1.0k tok/s
    clock, real_generate, real_prefill = [0.0], evaluate.generate, Mamba.prefill
    monkeypatch.setattr(evaluate, "time", types.SimpleNamespace(time=lambda: clock[0]))

    def generate(method, prompt, *a):
        clock[0] += prompt.shape[1] / 1000
        return real_generate(method, prompt, *a)

    def prefill(self, prefix, *a, **k):
        clock[0] += (prefix.shape[1] + 20) / 1000      # and the 20 scored tokens, one step each
        return real_prefill(self, prefix, *a, **k)

    monkeypatch.setattr(evaluate, "generate", generate)
    run(checkpoint, tmp_path, "--lengths", "128", "--depths", "0,1", "--samples", "2")
    run(checkpoint, tmp_path, "--lengths", "128", "--depths", "0,1", "--samples", "2", "--method", "decimamba")
    monkeypatch.setattr(Mamba, "prefill", prefill)
    ppl = ["--task", "ppl", "--windows", "2", "--predict", "20"]
    run(checkpoint, tmp_path, *ppl, "--lengths", "150")
    run(checkpoint, tmp_path, *ppl, "--lengths", "150,300")
    out = capsys.readouterr().out
    assert out.count("   1.0k prompt tok/s") == 2 and out.count("   1.0k tok/s") == 2 and "tok/s" not in \
        out.replace("   1.0k prompt tok/s", "").replace("   1.0k tok/s", "")
    assert "length     150: perplexity" in out and "windows kept from an earlier run" in out


def test_text_heatmap_without_matplotlib(monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("matplotlib") else real_import(name, *a, **k))
    accuracy = {"vanilla": {"100": {"0.0": 1.0, "1.0": 0.0}}}
    assert evaluate.heatmap("unused.png", accuracy, [100], [0.0, 1.0], "t") is None
    out = capsys.readouterr().out
    assert "text heatmap" in out and "█" in out and "depth" in out and "0   1" in out


def test_ppl_task(checkpoint, tmp_path, capsys):
    run(checkpoint, tmp_path, "--task", "ppl", "--method", "longmamba", "--lengths", "150,300", "--windows", "2",
        "--predict", "20")
    result = json.load(open(tmp_path / "ppl_vanilla_longmamba.json"))
    assert set(result["perplexity"]) == {"vanilla", "longmamba"} and result["units"] == "perplexity per token"
    for m in result["perplexity"].values():
        assert set(m) == {"150", "300"} and all(v > 1 for v in m.values())
    assert "perplexity" in capsys.readouterr().out


def test_longbench_predictions_are_keyed_by_settings(checkpoint, tmp_path, capsys):
    data_dir = os.path.join(ROOT, "tests", "data", "longbench")
    args = ["--task", "longbench", "--data-dir", data_dir, "--no-baseline", "--method", "vanilla",
            "--data", "no/prose/needed.txt"]
    run(checkpoint, tmp_path, *args, "--datasets", "trec,passage_count", "--max-length", "300")
    [run_dir] = os.listdir(tmp_path / "longbench")
    first = open(tmp_path / "longbench" / run_dir / "trec.jsonl").read()
    run(checkpoint, tmp_path, *args, "--datasets", "trec", "--max-length", "300")   # nothing redone
    assert open(tmp_path / "longbench" / run_dir / "trec.jsonl").read() == first
    assert "0 to go" in capsys.readouterr().out
    scores = json.load(open(tmp_path / "longbench" / run_dir / "scores.json"))["scores"]
    assert set(scores) == {"trec", "passage_count"}                                 # a subset run keeps the rest
    run(checkpoint, tmp_path, *args, "--datasets", "trec", "--max-length", "200")   # other settings: predicted anew
    assert len(os.listdir(tmp_path / "longbench")) == 2 and "already predicted, 2 to go" in capsys.readouterr().out


def test_a_malformed_prediction_file_is_one_line(checkpoint, tmp_path):
    args = ["--task", "longbench", "--data-dir", os.path.join(ROOT, "tests", "data", "longbench"), "--no-baseline",
            "--datasets", "trec", "--max-length", "300"]
    run(checkpoint, tmp_path, *args)
    [run_dir] = os.listdir(tmp_path / "longbench")
    with open(tmp_path / "longbench" / run_dir / "trec.jsonl", "a") as f:
        f.write("not json\n")
    with pytest.raises(SystemExit, match="trec.jsonl:3: malformed prediction line"):
        run(checkpoint, tmp_path, *args)


def test_a_stale_calibration_is_recomputed(checkpoint, tmp_path, capsys):
    path = os.path.join(checkpoint, evaluate.CALIBRATION_FILE)
    run(checkpoint, tmp_path, "--method", "longmamba", "--no-baseline", "--lengths", "200", "--samples", "1")
    run(checkpoint, tmp_path, "--method", "longmamba", "--no-baseline", "--lengths", "200", "--samples", "1",
        "--calibration-windows", "3")
    assert "other settings or another model; recalibrating" in capsys.readouterr().out
    assert torch.load(path, weights_only=True)["settings"]["windows"] == 3
    open(path, "wb").write(b"garbage")
    run(checkpoint, tmp_path, "--method", "longmamba", "--no-baseline", "--lengths", "200", "--samples", "1")
    assert "not a readable calibration (UnpicklingError); recalibrating" in capsys.readouterr().out


BAD_INPUTS = [
    (["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
    (["--device", "foo"], "--device foo: not a device"),
    (["--samples", "0"], "--samples must be ≥ 1, got 0"),
    (["--samples", "-1"], "--samples must be ≥ 1, got -1"),
    (["--L-train", "0"], "--L-train must be ≥ 1, got 0"),
    (["--task", "ppl", "--windows", "0"], "--windows must be ≥ 1, got 0"),
    (["--lengths", "4y"], "--lengths '4y': expected comma-separated token counts"),
    (["--lengths", ""], "--lengths '': expected comma-separated token counts"),       # not the default lengths
    (["--lengths", "infx"], "--lengths 'infx': expected comma-separated token counts"),
    (["--method", "mamba2"], "unknown --method mamba2: choose from vanilla, longmamba, decimamba, remamba"),
    (["--model", "no/such/dir"], "--model no/such/dir: no such directory"),        # and no out-dir made for it
    (["--data", "mamba.py", "--haystack", "checkpoints/mamba-testbed/pytorch_model.bin"],
     "--haystack checkpoints/mamba-testbed/pytorch_model.bin: not a readable UTF-8 text file"),
    (["--task", "longbench"], "--task longbench needs --data-dir"),
    (["--task", "longbench", "--data-dir", "tests/data/longbench", "--datasets", ""],    # not every dataset
     "--datasets: no {dataset}.jsonl file in tests/data/longbench for ''; found: "),
    (["--decimating-layers", "9", "--method", "decimamba"], "--decimating-layers 9: this model has layers 0..3"),
    (["--out-dir", "README.md"], "--out-dir README.md: cannot write there"),
    (["--depths", "2"], "--depths must lie in [0, 1]"),
    (["--depth", "0.5"], "unrecognized arguments: --depth 0.5"),
    (["--task", "longbench", "--max-length", "1"], "--max-length must be ≥ 2, got 1"),
    (["--tag", "_a/b"], "--tag '_a/b': it becomes part of file names, so it cannot hold a '/'"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS + [(["--haystack", "EMPTY"], "split is empty"),
                                                        (["--haystack", "ONE", "--split", "train"], "split is empty")])
def test_bad_inputs_exit_with_one_line(extra, message, tmp_path):
    texts = {"EMPTY": "\n", "ONE": "One sentence, all of it in the held-out split.\n"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    extra = [str(tmp_path / x) if x in texts else x for x in extra]
    out_dir = [] if "--out-dir" in extra else ["--out-dir", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "eval.py", "--device", "cpu", "--samples", "1", "--lengths", "512"]
                          + out_dir + extra, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2    # argparse adds its usage line
    assert "--model" not in extra or not (tmp_path / "out").exists()


def test_a_gpu_the_machine_lacks_is_one_line(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match="--device cuda:3: this machine has 1 CUDA GPU$"):
        evaluate.main(["--model", checkpoint, "--device", "cuda:3", "--out-dir", str(tmp_path)])


def test_device_cuda_selects_gpu_0(monkeypatch):
    """torch.cuda.set_device refuses a device without an index, as --device cuda and auto are."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d).index))
    for flag in ("cuda", "auto"):
        args = evaluate.parse_args(["--device", flag])
        assert evaluate.start(args)[0] == "cuda:0"
    assert chosen == [0, 0]


def test_bad_checkpoints_exit_with_one_line(tmp_path):
    model = Mamba(MambaConfig(d_model=16, n_layer=1, vocab_size=257))
    model.save_pretrained(tmp_path / "m", tokenizer.byte_encoding())
    weights = open(tmp_path / "m" / "pytorch_model.bin", "rb").read()
    cases = {"no train_info.json": ("pass --L-train", lambda d: None),
             "remamba.pt missing": ("remamba.pt: not ReMamba parameters for this model (FileNotFoundError",
                                    lambda d: json.dump({"L_train": 512}, open(d / "train_info.json", "w"))),
             "truncated weights": ("pytorch_model.bin: not a readable PyTorch weights file", lambda d: open(
                 d / "pytorch_model.bin", "wb").write(weights[:1000])),
             "config without n_layer": ("n_layer must be a positive integer, got None", lambda d: json.dump(
                 {"d_model": 16, "vocab_size": 257}, open(d / "config.json", "w")))}
    for name, (message, damage) in cases.items():
        damage(tmp_path / "m")
        done = subprocess.run([sys.executable, "eval.py", "--model", str(tmp_path / "m"), "--method", "remamba",
                               "--device", "cpu", "--out-dir", str(tmp_path / "out")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, (name, done.stderr)


def test_under_torchrun_longmamba_is_calibrated_once(tmp_path):
    """Rank 0 calibrates and saves; the other ranks wait for its file instead of calibrating again."""
    model = tmp_path / "model"
    shutil.copytree(os.path.join(ROOT, "checkpoints", "mamba-testbed"), model,
                    ignore=shutil.ignore_patterns("longmamba_calibration.pt"))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "eval.py", "--model", str(model), "--lengths", "512", "--depths", "0", "--samples", "2",
                           "--method", "longmamba", "--no-baseline", "--calibration-windows", "2", "--device", "cpu",
                           "--out-dir", str(tmp_path / "out")], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("calibrating on 2 windows") == 1, done.stdout
    assert (model / "longmamba_calibration.pt").exists()


def test_torchrun_shards_samples_and_gathers_the_same_table(tmp_path):
    # the bundled testbed, where the table is not all zeros: retrieval at 512, failures at 2048
    args = ["eval.py", "--lengths", "512,2048", "--depths", "0,1", "--samples", "2", "--method", "longmamba",
            "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable] + args + ["--out-dir", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                         + args + ["--out-dir", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    for m in ("vanilla", "longmamba"):
        a = json.load(open(tmp_path / "one" / f"passkey_{m}.json"))
        b = json.load(open(tmp_path / "two" / f"passkey_{m}.json"))
        assert a["accuracy"] == b["accuracy"] and a["samples"] == b["samples"] == 2
    assert json.load(open(tmp_path / "one" / "passkey_vanilla.json"))["accuracy"]["512"]["0.0"] == 1.0
    # two processes continue what one finished: every cell is read back, none is run again
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                           + args + ["--out-dir", str(tmp_path / "one")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "4 of 4 cells already done" in again.stdout, again.stdout + again.stderr[-2000:]
