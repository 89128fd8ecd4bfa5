"""What a user sees: train -> checkpoint -> resume -> sample from the CLI, errors, DDP."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import common
import ddgan
import ddim
import ddpm
import dreambooth
import guided
import ldm

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
    # a seed other than the default: --resume without --seed continues with the checkpoint's
    ddpm.main(["--train", "--preset", "tiny", "--max-steps", "12", "--out", full, "--n-samples", "1",
               "--seed", "7"])
    run("ddpm.py", "--train", "--preset", "tiny", "--max-steps", "6", "--out", part, "--n-samples", "1",
        "--seed", "7")
    half = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert half["step"] == 6 and half["script"] == "ddpm" and half["config"]["max_steps"] == 6
    ddpm.main(["--train", "--preset", "tiny", "--max-steps", "12", "--out", part, "--resume",
               "--n-samples", "1"])
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
    err = p.stderr.strip()
    assert p.returncode == 2 and err.startswith("error:") and len(err.splitlines()) == 1


def test_missing_or_foreign_checkpoint_gives_one_line_error(tmp_path):
    out = ["--out", str(tmp_path / "o")]   # not the default out/ddpm, which a user's run may hold
    p = run("ddpm.py", "--sample", "--ckpt", str(tmp_path / "nope.pt"), *out, check=False)
    assert p.returncode == 2 and "not found" in p.stderr and "--train" in p.stderr
    other = tmp_path / "other.pt"
    common.save_checkpoint({"script": "ddgan", "model": {}}, str(other))
    p = run("ddpm.py", "--sample", "--ckpt", str(other), *out, check=False)
    assert p.returncode == 2 and "ddgan.py checkpoint" in p.stderr
    p = run("ddpm.py", "--train", "--preset", "tiny", "--data", str(tmp_path / "missing"), *out, check=False)
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

    def objective(c, dev):
        return (lambda net, x, y, caps: diff.loss(net, x)), sample_fn
    common.train("ddpm", args, cfg, common.build_unet, objective, final_grid=False)
    assert sorted(f for f in os.listdir(out) if f.startswith("samples_")) == ["samples_000004.png",
                                                                              "samples_000008.png"]
    assert sizes == [16, 16]
    assert Image.open(os.path.join(out, "samples_000004.png")).size == (4 * 16 + 5 * 2,) * 2


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


# --- running where a reader runs it: bad flags, the output folder, Ctrl-C, logs -------------------------

def one_line_error(p, *fragments):
    """The process stopped with exit status 2 and one line `error: ...` naming each fragment."""
    err = p.stderr.strip()
    assert p.returncode == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and all(f in err for f in fragments), err


@pytest.mark.parametrize("flags, fragments", [
    (["--lr", "-1"], ["--lr -1", "> 0"]),
    (["--lr", "0"], ["--lr 0", "> 0"]),
    (["--lr", "nan"], ["--lr nan"]),
    (["--n-samples", "-3"], ["--n-samples -3", ">= 1"]),
    (["--n-samples", "0"], ["--n-samples 0", ">= 1"]),
    (["--max-steps", "x"], ["'x' is not an integer"]),
    (["--threads", "0"], ["--threads 0"]),
    (["--image-size", "4"], ["--image-size 4", "at least 8"]),
    (["--image-size", "25"], ["--image-size 25", "multiple of 2"]),
    ([], ["one of the arguments --train --sample --eval is required"]),
])
def test_bad_numbers_stop_with_one_line_before_any_work(tmp_path, flags, fragments):
    mode = [] if not flags else ["--train", "--preset", "tiny"]
    with pytest.raises(common.UserError) as e:
        ddpm.main([*mode, *flags, "--out", str(tmp_path / "o")])
    assert all(f in str(e.value) for f in fragments), str(e.value)
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_a_bad_flag_from_the_command_line_is_one_line(tmp_path):
    one_line_error(run("ddpm.py", "--train", "--lr", "-1", "--out", str(tmp_path), check=False),
                   "--lr -1: use a")


def test_unwritable_out_stops_at_start_up(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = str(blocker / "out")
    one_line_error(run("ddpm.py", "--train", "--preset", "tiny", "--out", out, check=False),
                   f"--out {out}: cannot write there")
    for script, mode in [(ddpm, ["--sample"]), (ddpm, ["--eval", "--n-samples", "2"]), (ddim, ["--sample"]),
                         (guided, ["--sample"]), (ddgan, ["--sample"]), (ldm, ["--sample"]),
                         (dreambooth, ["--sample"])]:
        with pytest.raises(common.UserError, match="cannot write there"):  # before looking for the checkpoint
            script.main(mode + ["--out", out])


def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_is_not(tmp_path):
    out = str(tmp_path / "o")
    with common.claim_out(out):                                    # this process holds the lock
        p = run("ddpm.py", "--train", "--preset", "tiny", "--max-steps", "2", "--out", out, check=False)
        one_line_error(p, f"--out {out} is in use by another run (pid {os.getpid()}")
        assert not os.path.exists(os.path.join(out, "ckpt.pt"))
    # released on exit; a lock file left by a dead process (a crash) holds no OS lock, so it is ignored
    with open(os.path.join(out, ".lock"), "w") as f:
        f.write("pid 999999999: ddpm.py --train")
    run("ddpm.py", "--train", "--preset", "tiny", "--max-steps", "2", "--n-samples", "1", "--out", out)
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 2


def test_graceful_stop_finishes_the_step_then_raises_and_a_second_ctrl_c_stops_at_once():
    with common.GracefulStop() as stop:
        signal.raise_signal(signal.SIGINT)                         # Ctrl-C in the middle of a step ...
        assert stop.requested                                      # ... only asks the loop to stop
        with pytest.raises(common.Interrupted, match="stopped at step 7 of 9; saved c.pt; continue with"):
            stop.check(7, 9, "c.pt")
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


@pytest.mark.parametrize("script", ["ddpm", "ddgan"])
def test_ctrl_c_saves_the_current_step_and_resume_continues_exactly(tmp_path, script):
    part, full = str(tmp_path / "part"), str(tmp_path / "full")
    cmd = [sys.executable, "-u", f"{script}.py", "--train", "--preset", "tiny", "--max-steps", "100000",
           "--out", part]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "steps 0 -> 100000" in proc.stdout.readline()          # the header: training starts now
    time.sleep(1.5)                                                # a few dozen steps, no checkpoint due yet
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    ck = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    k = ck["step"]
    assert 0 < k < 100000 and "--resume" in err
    assert f"interrupted: stopped at step {k} of 100000; saved" in err
    # resuming the interrupted run equals an uninterrupted one, step for step
    main = {"ddpm": ddpm, "ddgan": ddgan}[script].main
    main(["--train", "--resume", "--max-steps", str(k + 3), "--n-samples", "1", "--out", part])
    main(["--train", "--preset", "tiny", "--max-steps", str(k + 3), "--n-samples", "1", "--out", full])
    a = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == k + 3
    assert all(states_equal(a[key], b[key]) for key in ("model", "ema", "G", "D") if key in a)


def test_resume_names_ignored_flags_and_says_when_there_is_nothing_to_do(tmp_path):
    out = str(tmp_path / "o")
    run("ddpm.py", "--train", "--preset", "tiny", "--max-steps", "4", "--n-samples", "1", "--out", out)
    os.remove(os.path.join(out, "samples.png"))
    p = run("ddpm.py", "--train", "--resume", "--out", out)       # its own --max-steps (4): done
    assert "already at step 4 (--max-steps 4); nothing to train" in p.stdout
    assert not os.path.exists(os.path.join(out, "samples.png"))   # and no grid is drawn again
    p = run("ddpm.py", "--train", "--resume", "--max-steps", "6", "--lr", "0.5", "--batch-size", "3",
            "--schedule", "cosine", "--seed", "9", "--n-samples", "1", "--out", out)
    for flag, kept, given in (("--lr", "0.001", "0.5"), ("--batch-size", "8", "3"),
                              ("--schedule", "linear", "cosine"), ("--seed", "0", "9")):
        assert f"continues with the checkpoint's {flag} {kept}; {flag} {given} is ignored" in p.stderr
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["step"] == 6 and ck["config"]["lr"] == 1e-3 and ck["config"]["schedule"] == "linear"
    assert ck["seed"] == 0


@pytest.mark.parametrize("content, fragment", [
    (b"", "is empty (0 bytes)"),
    (b"<!DOCTYPE html><html>Not Found</html>",
     "is a text file, not a checkpoint (it starts with '<!DOCTYPE html>"),
    (b"\x00\x01\x02\x03garbage", "is not a PyTorch checkpoint"),
    (b"truncated", None),
    (b"safetensors", "is a .safetensors weights file"),
])
def test_unreadable_checkpoints_are_described(tmp_path, content, fragment):
    path = tmp_path / "bad.pt"
    if content == b"truncated":
        common.save_checkpoint({"script": "ddpm", "w": torch.zeros(1000)}, str(path))
        content, fragment = path.read_bytes()[:300], "is a damaged or truncated checkpoint"
    if content == b"safetensors":
        header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
        content = len(header).to_bytes(8, "little") + header + b"\x00" * 4
    path.write_bytes(content)
    with pytest.raises(common.UserError, match=re.escape(fragment)):
        common.load_checkpoint(str(path), ["ddpm"])
    assert common.ANSI.sub("", "\x1b[1mbold\x1b[0m text") == "bold text"  # escapes are stripped from messages


def test_sample_steps_respace_and_no_gif(tmp_path, capsys):
    out = str(tmp_path / "o")
    ddpm.main(["--train", "--preset", "tiny", "--max-steps", "2", "--n-samples", "1", "--out", out])
    ddpm.main(["--sample", "--out", out, "--n-samples", "2", "--steps", "7", "--no-gif"])
    assert "7 steps: wrote" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "reverse.gif"))
    with pytest.raises(common.UserError, match="--steps 101: use 1..100"):
        ddpm.main(["--sample", "--out", out, "--steps", "101"])
    ddpm.main(["--sample", "--out", out, "--n-samples", "2", "--steps", "30"])
    assert Image.open(os.path.join(out, "reverse.gif")).n_frames == ddpm.GIF_FRAMES


def test_progress_in_a_log_file_is_plain_lines(tmp_path):
    p = run("ddpm.py", "--train", "--preset", "tiny", "--n-samples", "1", "--out", str(tmp_path / "o"))
    lines = [line for line in p.stderr.splitlines() if line.startswith("ddpm: step")]
    assert "\r" not in p.stderr and len(lines) == 4                # tiny: 20 steps, a line every 5
    assert lines[-1].startswith("ddpm: step 20/20, loss ") and "steps/s" in lines[-1]


def test_help_of_every_script_cites_papers_not_files_the_repository_lacks(capsys):
    for script in (ddpm, ddim, guided, ddgan, ldm, dreambooth):
        with pytest.raises(SystemExit):
            script.main(["--help"])
        text = capsys.readouterr().out
        assert "PAPERS.md" not in text and "pitfall" not in text and "--threads" in text


def test_pytest_prints_its_summary_line(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_ok():\n    assert True\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", os.path.join(ROOT, "pytest.ini"),
                        "--rootdir", str(tmp_path), str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert "1 passed" in p.stdout
