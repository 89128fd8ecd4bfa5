"""What a user sees: train -> checkpoint -> resume -> sample from the CLI, errors, DDP."""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import common
import ddpm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None, check=True):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_resume_matches_uninterrupted_then_sample(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run("ddpm.py", "--train", "--preset", "tiny", "--max-steps", "12", "--out", full)
    run("ddpm.py", "--train", "--preset", "tiny", "--max-steps", "6", "--out", part)
    half = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert half["step"] == 6 and half["script"] == "ddpm" and half["config"]["max_steps"] == 6
    run("ddpm.py", "--train", "--preset", "tiny", "--max-steps", "12", "--out", part, "--resume")
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 12
    assert states_equal(a["model"], b["model"]) and states_equal(a["ema"], b["ema"])
    assert not states_equal(a["model"], half["model"])  # training did change the weights
    assert a["opt"]["state"][0]["step"] == b["opt"]["state"][0]["step"] == 12

    run("ddpm.py", "--sample", "--ckpt", os.path.join(full, "ckpt.pt"), "--out", str(tmp_path / "s"),
            "--n-samples", "4")
    grid = Image.open(tmp_path / "s" / "samples.png")
    assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 grid of 16px images with 2px padding
    gif = Image.open(tmp_path / "s" / "reverse.gif")
    assert gif.n_frames > 10


def test_sampling_is_reproducible_from_the_seed(tmp_path):
    out = str(tmp_path / "o")
    ddpm.main(["--train", "--preset", "tiny", "--max-steps", "4", "--out", out, "--n-samples", "2"])
    model, diff, ck = ddpm.load(os.path.join(out, "ckpt.pt"), torch.device("cpu"))
    torch.manual_seed(3)
    x1 = diff.sample(model, (2, 3, 16, 16), "cpu")[0]
    torch.manual_seed(3)
    x2 = diff.sample(model, (2, 3, 16, 16), "cpu")[0]
    assert torch.equal(x1, x2) and x1.abs().max() <= 1.0


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"script": "ddpm", "payload": Evil()}, bad)
    with pytest.raises(common.UserError, match="refused"):
        common.load_checkpoint(str(bad), ["ddpm"])
    p = run("ddpm.py", "--sample", "--ckpt", str(bad), "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1


def test_missing_or_foreign_checkpoint_gives_one_line_error(tmp_path):
    p = run("ddpm.py", "--sample", "--ckpt", str(tmp_path / "nope.pt"), check=False)
    assert p.returncode == 2 and "not found" in p.stderr and "--train" in p.stderr
    other = tmp_path / "other.pt"
    common.save_checkpoint({"script": "ddgan", "model": {}}, str(other))
    p = run("ddpm.py", "--sample", "--ckpt", str(other), check=False)
    assert p.returncode == 2 and "ddgan.py checkpoint" in p.stderr
    p = run("ddpm.py", "--train", "--preset", "tiny", "--data", str(tmp_path / "missing"), check=False)
    assert p.returncode == 2 and "no such file" in p.stderr and "Traceback" not in p.stderr


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    out = str(tmp_path / "o")
    args = common.make_parser("ddpm", "", ddpm.PRESETS).parse_args(
        ["--train", "--preset", "tiny", "--out", out, "--max-steps", "30"])
    cfg = common.make_config(args, ddpm.PRESETS)
    diff = ddpm.diffusion_from(cfg, "cpu")
    calls = {"n": 0}

    def loss_fn(net, x, y, caps):
        calls["n"] += 1
        loss = diff.loss(net, x)
        return loss * float("nan") if calls["n"] > 12 else loss

    with pytest.raises(common.UserError, match="kept"):
        common.train("ddpm", args, cfg, common.build_unet, lambda c, dev: (loss_fn, None), final_grid=False)
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["step"] == 10  # the checkpoint of step 10 (ckpt_every=10) survives; 20 was never written
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_training_writes_periodic_sample_grids(tmp_path):
    out = str(tmp_path / "o")
    args = common.make_parser("ddpm", "", ddpm.PRESETS).parse_args(
        ["--train", "--preset", "tiny", "--out", out, "--max-steps", "10"])
    cfg = {**common.make_config(args, ddpm.PRESETS), "sample_every": 4}
    diff = ddpm.diffusion_from(cfg, "cpu")
    sizes = []

    def sample_fn(ema, n):
        sizes.append(n)
        return diff.sample(ema, (n, 3, 16, 16), "cpu")[0]
    common.train("ddpm", args, cfg, common.build_unet, lambda c, dev: (lambda net, x, y, caps: diff.loss(net, x),
                                                                       sample_fn), final_grid=False)
    assert sorted(f for f in os.listdir(out) if f.startswith("samples_")) == ["samples_000004.png", "samples_000008.png"]
    assert sizes == [16, 16] and Image.open(os.path.join(out, "samples_000004.png")).size == (4 * 16 + 5 * 2,) * 2


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint({"script": "ddpm", "step": 1}, path)

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        common.save_checkpoint({"script": "ddpm", "step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


def test_help_lists_the_contract_flags():
    out = run("ddpm.py", "--help").stdout
    for flag in ["--train", "--sample", "--eval", "--data", "--out", "--ckpt", "--resume", "--max-steps",
                 "--batch-size", "--n-samples", "--device", "--dtype", "--compile", "--seed", "--preset",
                 "--image-size", "--channels", "--lr"]:
        assert flag in out


def test_ddp_two_cpu_processes_agree_and_only_rank0_writes(tmp_path):
    out = str(tmp_path / "ddp")
    p = run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
            "tests/ddp_worker.py", out, str(tmp_path / "ranks"), env={"OMP_NUM_THREADS": "1"})
    assert "world size 2" in p.stdout and "global batch 8 = 4 x 2" in p.stdout
    w0 = torch.load(tmp_path / "ranks" / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "ranks" / "rank1.pt", weights_only=True)
    assert states_equal(w0, w1)
    assert os.listdir(out) == ["ckpt.pt"]
    assert (tmp_path / "ranks" / "wrote0").exists() and not (tmp_path / "ranks" / "wrote1").exists()
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 4
