"""train.py: bit-for-bit resume, DDP equals one process, clear errors before any work."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tokenizer", "bytes", "--d-model", "32", "--n-layer", "2", "--L-train", "300", "--batch-size", "4",
        "--warmup", "2", "--log-every", "1", "--eval-samples", "0", "--device", "cpu"]


def run_main(args):
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        train.main(args)
    finally:
        os.chdir(cwd)


def weights(directory):
    return torch.load(os.path.join(directory, "pytorch_model.bin"), weights_only=True)


def test_resume_continues_bit_for_bit(tmp_path, capsys):
    run_main(["--out", str(tmp_path / "straight"), "--steps", "4"] + TINY)
    # the same run stopped by the time limit after its first step, then resumed
    run_main(["--out", str(tmp_path / "resumed"), "--steps", "4", "--time-limit", "1e-9"] + TINY)
    out = capsys.readouterr().out
    assert "time limit reached at step 1" in out
    assert json.load(open(tmp_path / "resumed" / "train_info.json"))["steps"] == 1
    run_main(["--out", str(tmp_path / "resumed"), "--steps", "4", "--resume"] + TINY)
    assert "resumed" in capsys.readouterr().out
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(SystemExit, match=r"--seed 1 \(the run used 0\)"):
        run_main(["--out", str(tmp_path / "resumed"), "--steps", "5", "--resume", "--seed", "1"] + TINY)
    info = json.load(open(tmp_path / "resumed" / "train_info.json"))
    assert info["L_train"] == 300 and info["steps"] == 4 and info["finished"]
    assert sorted(os.listdir(tmp_path / "resumed")) == ["config.json", "pytorch_model.bin", "tokenizer.tiktoken",
                                                        "tokenizer.tiktoken.json", "train_info.json",
                                                        "train_state.pt"]


def losses(output):
    return [float(x) for x in re.findall(r"loss ([0-9.]+)", output)]


def test_ddp_two_processes_match_one(tmp_path):
    args = ["--steps", "3"] + TINY
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "train.py", "--out", str(tmp_path / "one")] + args, cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", "--out", str(tmp_path / "two")] + args, cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 processes" in ddp.stdout
    one, two = losses(single.stdout), losses(ddp.stdout)
    assert len(one) == len(two) == 3
    assert one == pytest.approx(two, abs=1.5e-4)  # the logs print 4 decimals
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("extra,message", [
    (["--d-model", "40"], "--d-model 40 must be a multiple of 16"),
    (["--L-train", "100"], "--L-train 100 leaves no room for filler"),
    (["--data", "no/such/file.txt"], "--data no/such/file.txt: not found"),
    (["--batch-size", "5", "--grad-accum", "2"], "--batch-size 5 must be divisible"),
    (["--tokenizer", "missing.tiktoken"], "--tokenizer missing.tiktoken: no such file"),
    (["--method", "remamba"], "--method remamba needs --init"),
    (["--train-base"], "--init and --train-base belong to --method remamba"),
    (["--resume"], "nothing to resume"),
    (["--other-weight", "1"], "--other-weight must be in [0, 1)"),
    (["--log-every", "0"], "--log-every must be ≥ 1"),
])
def test_bad_configs_stop_with_a_clear_message(tmp_path, extra, message):
    with pytest.raises(SystemExit) as e:
        run_main(["--out", str(tmp_path / "x"), "--steps", "1"] + TINY + extra)
    assert message in str(e.value)
    assert not os.path.exists(tmp_path / "x" / "train_state.pt")


def test_remamba_with_base_resumes_bit_for_bit(tmp_path):
    run_main(["--out", str(tmp_path / "base"), "--steps", "1"] + TINY)
    remamba_args = ["--method", "remamba", "--init", str(tmp_path / "base"), "--train-base", "--steps", "3",
                    "--batch-size", "2", "--warmup", "1", "--log-every", "1", "--eval-samples", "0", "--device", "cpu"]
    run_main(remamba_args + ["--out", str(tmp_path / "straight")])
    run_main(remamba_args + ["--out", str(tmp_path / "resumed"), "--time-limit", "1e-9"])
    run_main(remamba_args + ["--out", str(tmp_path / "resumed"), "--resume"])
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = torch.load(tmp_path / "straight" / "remamba.pt", weights_only=True)["state_dict"]
    rb = torch.load(tmp_path / "resumed" / "remamba.pt", weights_only=True)["state_dict"]
    for k in ra:
        assert torch.equal(ra[k], rb[k]), k
    assert not torch.equal(a["backbone.norm_f.weight"], weights(tmp_path / "base")["backbone.norm_f.weight"])
