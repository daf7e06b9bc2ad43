"""eval.py end to end on a tiny checkpoint: tables, result files, pictures, errors."""
import json
import os

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
    return str(directory)


def test_passkey_all_methods_write_results(checkpoint, tmp_path, capsys):
    from remamba import ReMamba
    ReMamba(Mamba.from_pretrained(checkpoint)).save(os.path.join(checkpoint, "remamba.pt"))
    evaluate.main(["--model", checkpoint, "--method", "longmamba,decimamba,remamba", "--lengths", "128,256",
                   "--depths", "0,1", "--samples", "2", "--data", DATA, "--out-dir", str(tmp_path),
                   "--calibration-windows", "4"])
    out = capsys.readouterr().out
    for m in evaluate.METHODS:
        assert f"{m}: passkey accuracy (%)" in out
        result = json.load(open(tmp_path / f"passkey_{m}.json"))
        assert result["method"] == m and result["lengths"] == [128, 256] and result["depths"] == [0.0, 1.0]
        assert result["samples"] == 2 and result["L_train"] == 128
        assert set(result["accuracy"]) == {"128", "256"} and set(result["accuracy"]["256"]) == {"0.0", "1.0"}
        assert all(0 <= a <= 1 for row in result["accuracy"].values() for a in row.values())
        for key in ("command", "commit", "device", "model"):
            assert result[key]
    assert "LongMamba calibration" in out and "global channels" in out
    assert os.path.isfile(os.path.join(checkpoint, evaluate.CALIBRATION_FILE))
    pytest.importorskip("matplotlib")
    assert os.path.getsize(tmp_path / "passkey_remamba.png") > 1000


def test_same_samples_give_the_same_vanilla_table(checkpoint, tmp_path):
    args = ["--model", checkpoint, "--lengths", "128", "--depths", "0.5", "--samples", "3", "--data", DATA]
    evaluate.main(args + ["--out-dir", str(tmp_path / "a")])
    evaluate.main(args + ["--method", "decimamba", "--out-dir", str(tmp_path / "b")])
    a = json.load(open(tmp_path / "a" / "passkey_vanilla.json"))["accuracy"]
    b = json.load(open(tmp_path / "b" / "passkey_vanilla.json"))["accuracy"]
    assert a == b


def test_text_heatmap_without_matplotlib(monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("matplotlib") else real_import(name, *a, **k))
    accuracy = {"vanilla": {"100": {"0.0": 1.0, "1.0": 0.0}}}
    assert evaluate.heatmap("unused.png", ["vanilla"], [100], [0.0, 1.0], accuracy, "t") is None
    out = capsys.readouterr().out
    assert "text heatmap" in out and "█" in out


def test_ppl_task(checkpoint, tmp_path, capsys):
    evaluate.main(["--model", checkpoint, "--task", "ppl", "--method", "longmamba", "--lengths", "150,300",
                   "--windows", "2", "--predict", "20", "--data", DATA, "--out-dir", str(tmp_path),
                   "--calibration-windows", "4"])
    result = json.load(open(tmp_path / "ppl_vanilla_longmamba.json"))
    assert set(result["perplexity"]) == {"vanilla", "longmamba"}
    for m in result["perplexity"].values():
        assert set(m) == {"150", "300"} and all(v > 1 for v in m.values())


def test_longbench_task_and_resume(checkpoint, tmp_path, capsys):
    data_dir = os.path.join(ROOT, "tests", "data", "longbench")
    args = ["--model", checkpoint, "--task", "longbench", "--data-dir", data_dir, "--datasets", "trec,passage_count",
            "--out-dir", str(tmp_path), "--no-baseline", "--max-length", "300"]
    evaluate.main(args)
    first = open(tmp_path / "longbench" / f"{os.path.basename(checkpoint)}_vanilla" / "trec.jsonl").read()
    scores = json.load(open(tmp_path / f"longbench_{os.path.basename(checkpoint)}_vanilla.json"))["scores"]
    assert set(scores) == {"trec", "passage_count"}
    evaluate.main(args)  # everything already predicted: nothing is redone, nothing duplicated
    assert open(tmp_path / "longbench" / f"{os.path.basename(checkpoint)}_vanilla" / "trec.jsonl").read() == first
    assert "0 to go" in capsys.readouterr().out


def test_bad_arguments_give_clear_errors(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--method", "mamba2"])
    assert "unknown --method mamba2: choose from vanilla, longmamba, decimamba, remamba" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such directory"):
        evaluate.main(["--model", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--task longbench needs --data-dir"):
        evaluate.main(["--model", checkpoint, "--task", "longbench"])
    os.makedirs(tmp_path / "bare")
    Mamba(MambaConfig(d_model=16, n_layer=1, vocab_size=2048)).save_pretrained(
        tmp_path / "bare", tokenizer.load_tiktoken(os.path.join(ROOT, "data", "bpe2048.tiktoken")))
    with pytest.raises(SystemExit, match="pass --L-train"):
        evaluate.main(["--model", str(tmp_path / "bare"), "--data", DATA])
    with pytest.raises(FileNotFoundError, match="train.py --method remamba"):
        evaluate.main(["--model", str(tmp_path / "bare"), "--L-train", "128", "--method", "remamba", "--data", DATA])


def test_torchrun_shards_samples_and_gathers_the_same_table(tmp_path):
    import subprocess
    import sys
    # the bundled testbed, where the table is not all zeros: retrieval at 512, failures at 2048
    args = ["eval.py", "--lengths", "512,2048", "--depths", "0,1", "--samples", "2", "--data", DATA,
            "--method", "longmamba"]
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
