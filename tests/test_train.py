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


def test_resume_continues_bit_for_bit_from_out_alone(tmp_path, capsys):
    run_main(["--out", str(tmp_path / "straight"), "--steps", "4"] + TINY)
    # the same run stopped by the time limit after its first step, then resumed with --out and --resume only
    run_main(["--out", str(tmp_path / "resumed"), "--steps", "4", "--time-limit", "1e-9"] + TINY)
    assert "time limit reached at step 1" in capsys.readouterr().out
    assert json.load(open(tmp_path / "resumed" / "train_info.json"))["steps"] == 1
    run_main(["--out", str(tmp_path / "resumed"), "--resume"])
    assert "resumed" in capsys.readouterr().out
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(SystemExit, match=r"--seed 1 \(the run used 0\)"):
        run_main(["--out", str(tmp_path / "resumed"), "--resume", "--seed", "1"])
    with pytest.raises(SystemExit, match="--log-every must be ≥ 1, got 0"):              # a setting typed again
        run_main(["--out", str(tmp_path / "resumed"), "--resume", "--log-every", "0"])   # is checked again
    info = json.load(open(tmp_path / "resumed" / "train_info.json"))
    assert info["L_train"] == 300 and info["steps"] == 4 and info["finished"]
    assert info["settings"]["lr"] == 1e-3 and info["settings"]["d_model"] == 32     # every setting, defaults too
    assert sorted(os.listdir(tmp_path / "resumed")) == ["config.json", "pytorch_model.bin", "tokenizer.tiktoken",
                                                        "tokenizer.tiktoken.json", "train_info.json",
                                                        "train_log.txt", "train_state.pt"]
    run_main(["--out", str(tmp_path / "resumed"), "--resume", "--steps", "6"])      # a longer run may continue
    assert json.load(open(tmp_path / "resumed" / "train_info.json"))["steps"] == 6


def test_an_existing_model_is_never_overwritten_silently(tmp_path):
    run_main(["--out", str(tmp_path / "m"), "--steps", "1"] + TINY)
    os.remove(tmp_path / "m" / "train_state.pt")                                   # a model, no training run
    before = open(tmp_path / "m" / "pytorch_model.bin", "rb").read()
    with pytest.raises(SystemExit, match="already holds a model: choose another --out, or add --overwrite"):
        run_main(["--out", str(tmp_path / "m"), "--steps", "1"] + TINY)
    assert open(tmp_path / "m" / "pytorch_model.bin", "rb").read() == before
    run_main(["--out", str(tmp_path / "m"), "--steps", "1", "--seed", "3", "--overwrite"] + TINY)
    assert open(tmp_path / "m" / "pytorch_model.bin", "rb").read() != before
    with pytest.raises(SystemExit, match="holds a training run: add --resume"):
        run_main(["--out", str(tmp_path / "m"), "--steps", "1", "--overwrite"] + TINY)


def test_ctrl_c_saves_and_says_how_to_continue(tmp_path, monkeypatch):
    real = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, args: (_ for _ in ()).throw(KeyboardInterrupt) if step == 2
                        else real(step, args))
    with pytest.raises(SystemExit, match="interrupted at step 2; saved, continue with: python train.py --out"):
        run_main(["--out", str(tmp_path / "c"), "--steps", "4"] + TINY)
    assert torch.load(tmp_path / "c" / "train_state.pt", weights_only=False)["step"] == 2


def losses(output):
    return [float(x) for x in re.findall(r"\| loss ([0-9.]+)", output)]


def answer_losses(output):  # None for a logged step without answer tokens
    return [None if x == "-" else float(x) for x in re.findall(r"\| answer loss +([0-9.]+|-)", output)]


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
    one, two = answer_losses(single.stdout), answer_losses(ddp.stdout)
    assert len(one) == 3 and [a is None for a in one] == [a is None for a in two]
    assert [a for a in one if a is not None] == pytest.approx([a for a in two if a is not None], abs=0.05)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("extra,message", [
    (["--d-model", "40"], "--d-model 40 must be a positive multiple of 16"),
    (["--L-train", "100"], "--L-train 100 leaves no room for filler"),
    (["--data", "no/such/file.txt"], "--data no/such/file.txt: not a readable UTF-8 text file (FileNotFoundError)"),
    (["--data", "checkpoints/mamba-testbed/pytorch_model.bin"], "not a readable UTF-8 text file"),
    (["--batch-size", "5", "--grad-accum", "2"], "--batch-size 5 must be divisible"),
    (["--tokenizer", "missing.tiktoken"], "--tokenizer missing.tiktoken: no such file"),
    (["--tokenizer", "bpe:abc"], "--tokenizer bpe:abc: bpe:N takes a vocabulary size"),
    (["--method", "remamba"], "--method remamba needs --init"),
    (["--method", "sft", "--init", "checkpoints/mamba-testbed", "--train", "new"], "trains nothing"),
    (["--init", "checkpoints/mamba-testbed"], "--init belongs to --method remamba and sft"),
    (["--resume"], "nothing to resume"),
    (["--other-weight", "1"], "--other-weight must be in [0, 1)"),
    (["--log-every", "0"], "--log-every must be ≥ 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--steps", "0"], "--steps must be ≥ 1"),
    (["--L-train", "0"], "--L-train 0 leaves no room for filler"),
    (["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
    (["--device", "foo"], "--device foo: not a device"),
    (["--compile", "graphs"], "--compile graphs needs one GPU process and --grad-accum 1"),
    (["--prompt-lengths", "4,1"], "--prompt-lengths takes two multiples"),
    (["--eval-lengths", "1,x"], "--eval-lengths positive multiples (got '1,x')"),
    (["--method", "lora"], "argument --method: invalid choice"),
    (["--ste", "6"], "unrecognized arguments: --ste 6"),
])
def test_bad_configs_stop_with_a_clear_message(tmp_path, extra, message):
    with pytest.raises(SystemExit) as e:
        run_main(["--out", str(tmp_path / "x"), "--steps", "1"] + TINY + extra)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "x" / "train_state.pt")


@pytest.mark.parametrize("method", ["remamba", "sft"])
def test_fine_tuning_resumes_bit_for_bit(tmp_path, method):
    run_main(["--out", str(tmp_path / "base"), "--steps", "1"] + TINY)
    args = ["--method", method, "--init", str(tmp_path / "base"), "--steps", "3", "--batch-size", "2", "--warmup",
            "1", "--log-every", "1", "--eval-samples", "0", "--device", "cpu", "--prompt-lengths", "1,1.5"]
    run_main(args + ["--out", str(tmp_path / "straight")])
    run_main(args + ["--out", str(tmp_path / "resumed"), "--time-limit", "1e-9"])
    run_main(["--out", str(tmp_path / "resumed"), "--resume"])
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    base = weights(tmp_path / "base")
    assert not torch.equal(a["backbone.layers.0.mixer.in_proj.weight"], base["backbone.layers.0.mixer.in_proj.weight"])
    assert torch.equal(a["backbone.layers.0.mixer.x_proj.weight"], base["backbone.layers.0.mixer.x_proj.weight"])
    if method == "remamba":
        ra = torch.load(tmp_path / "straight" / "remamba.pt", weights_only=True)["state_dict"]
        rb = torch.load(tmp_path / "resumed" / "remamba.pt", weights_only=True)["state_dict"]
        assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    assert json.load(open(tmp_path / "resumed" / "train_info.json"))["L_train"] == 300
