"""bench/gpu.py, the one command for a GPU session, proved on the CPU: every stage runs and writes what the
JSON promises, a failing script is named and the run goes on, a hung command is killed at its timeout."""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench  # noqa: E402
import common  # noqa: E402
import ddpm  # noqa: E402
import gpu  # noqa: E402


def test_the_cpu_run_runs_every_stage_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "gpu"
    rc = gpu.main(["--device", "cpu", "--out", str(out), "--scripts", "ddpm"])  # its stages are subprocesses
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rep = json.load(open(out / "gpu.json"))
    st = rep["stages"]
    assert rep["complete"] and rep["device"] == "cpu" and list(st) == gpu.STAGE_NAMES
    for name, s in st.items():
        if name.startswith("compile"):  # torch.compile is skipped on the CPU, and says why
            assert s["status"] == "skipped" and "on the CPU" in s["reason"], (name, s)
        else:
            assert s["status"] == "ok", (name, s)
    assert st["env"]["torch"] == torch.__version__ and st["env"]["peak_bf16_tflops"] is None
    # smoke: the script's --train then its --sample, from its command line, each writing its file
    smoke = [(c["script"], c["mode"], c["ok"]) for c in st["smoke"]["commands"]]
    assert smoke == [("ddpm.py", "train", True), ("ddpm.py", "sample", True)]
    assert (out / "smoke" / "ddpm" / "ckpt.pt").exists() and (out / "smoke" / "ddpm" / "samples.png").exists()
    # torchrun: the script's 20 steps under gloo, an all_reduce, DDP steps
    t = st["torchrun"]
    assert (t["backend"], t["world_size"], t["ddpm_checkpoint_step"]) == ("gloo", 1, 20)
    assert t["all_reduce"] == [1.0] * 4
    assert t["ddp_img_s"] > 0 and t["ddp_peak_mem_mb"] > 0
    # training throughput: both networks in fp32 and bf16, with the figures the JSON promises
    runs = st["train"]["runs"]
    assert [(r["model"], r["dtype"]) for r in runs] == [("ddpm", "float32"), ("ddpm", "bfloat16"),
                                                        ("ldm", "float32"), ("ldm", "bfloat16")]
    for r in runs:
        assert r["ok"] and r["batch"] == 4 and r["peak_mem_mb"] > 0
        assert "mfu" not in r                                                  # no peak known: no MFU
        assert abs(r["img_s"] * r["step_ms"] / 1e3 - r["batch"]) < 1e-6 and r["spread"] >= 0
        assert abs(r["tflops"] * r["step_ms"] / 1e3 - r["gflop_per_step"] / 1e3) < 1e-9 and r["tflops"] > 0
    # the FLOPs are the network's forward and backward at this batch, counted as bench.py counts them
    model = common.build_unet(ddpm.PRESETS["tiny"])
    flops = bench.count_train_flops(model, torch.randn(4, 3, 16, 16), torch.randint(0, 100, (4,)))
    assert runs[0]["gflop_per_step"] == runs[1]["gflop_per_step"] == flops / 1e9
    assert runs[0]["params_M"] == common.count_params(model) / 1e6
    assert st["train"]["matmul_tflops"]["bfloat16"] > 0 and st["train"]["shapes_data_img_s"] > 0
    samples = st["sample"]["runs"]
    assert [(r["model"], r["dtype"], r["steps"], r["batch"]) for r in samples] == [
        ("ddpm", "bfloat16", 3, 4), ("ddpm", "float32", 3, 4), ("ldm", "bfloat16", 3, 4)]
    for r in samples:
        assert r["ok"] and r["tflops"] > 0 and r["peak_mem_mb"] > 0 and r["spread"] >= 0
        assert abs(r["img_s"] * r["s_per_batch"] - r["batch"]) < 1e-6
    assert rep["targets"]["no_script_failing"]["met"] is True
    assert rep["targets"]["mfu_ddpm_bf16_compile"]["met"] is None              # not measured on a CPU
    assert "training step" in printed and "ldm.py tiny (latent)" in printed and "wrote" in printed


def test_a_failing_script_is_named_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    fail = "import sys; sys.exit('error: no such thing')"
    lanes = [[("ddpm", "train", ["-c", fail, "--out", a], "ckpt.pt"),
              ("ddpm", "sample", ["-c", "pass", "--out", a], "samples.png")],
             [("ddim", "train", ["-c", "pass", "--out", b], "ckpt.pt")]]
    monkeypatch.setattr(gpu, "smoke_plan", lambda dev, out, scripts: lanes)
    out = tmp_path / "gpu"
    assert gpu.main(["--device", "cpu", "--out", str(out), "--stages", "smoke", "compile_ddpm"]) == 1
    rep = json.load(open(out / "gpu.json"))
    assert rep["stages"]["smoke"]["status"] == "failed"
    assert rep["stages"]["smoke"]["failed"] == [
        "ddpm.py --train: error: no such thing", "ddpm.py --sample: not run: ddpm.py --train failed",
        f"ddim.py --train: exit status 0 but {b}/ckpt.pt was not written"]
    assert rep["stages"]["compile_ddpm"]["status"] == "skipped"                # the run went on
    assert rep["targets"]["no_script_failing"]["met"] is False
    printed = capsys.readouterr().out
    assert "FAILED: smoke (ddpm.py --train: error: no such thing;" in printed


def test_a_hung_command_is_killed_at_its_timeout_with_its_children(tmp_path):
    hang = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(60)']); print('child', c.pid, flush=True); time.sleep(60)")
    rc, secs, lines = gpu.run_cmd([sys.executable, "-c", hang], str(tmp_path / "hang.log"), timeout=2)
    assert rc is None and secs < 20 and gpu.error_line(lines, rc, secs).startswith("timed out after")
    child = int(next(s for s in lines if s.startswith("child")).split()[1])
    for _ in range(50):  # the grandchild is gone (or a zombie, waiting to be reaped)
        try:
            state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {child} outlived the timeout")


def test_a_failing_measurement_is_recorded_and_the_next_one_runs(tmp_path):
    runs = [{"model": "ddpm", "dtype": "float16"}, {"model": "ddpm", "dtype": "float32"}]
    args = argparse.Namespace(spec=json.dumps({"runs": runs}), result=str(tmp_path / "r.json"))
    assert gpu.worker_measure(args, torch.device("cpu"), gpu.measure_sample) == 1
    res = json.load(open(tmp_path / "r.json"))["runs"]
    assert [r["ok"] for r in res] == [False, True] and "float16" in res[0]["error"] and res[1]["img_s"] > 0


def test_mfu_peaks_match_the_card_names_torch_reports():
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989      # SXM
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756
    assert gpu.peak_tflops("NVIDIA H100 NVL") == 835
    assert gpu.peak_tflops("NVIDIA H200") == 989
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == gpu.peak_tflops("NVIDIA A100 80GB PCIe") == 312
    assert gpu.peak_tflops("NVIDIA GeForce RTX 4090") is None  # unknown: MFU left out


def test_gpu_sh_hands_back_the_json_and_the_logs(tmp_path):
    dest = tmp_path / "dest"
    p = subprocess.run(["bash", "bench/gpu.sh", str(dest), "--device", "cpu", "--stages", "env"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": sys.executable, "GPU_OUT": str(tmp_path / "gpu")})
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.load(open(dest / "gpu.json"))["stages"]["env"]["status"] == "ok"
    assert tarfile.open(dest / "gpu_logs.tar.gz").getnames() == ["logs", "results"]
