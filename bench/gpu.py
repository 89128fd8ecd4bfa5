"""
One command that proves and measures every script on a GPU, made for short and rare GPU sessions: no
arguments needed, under 8 minutes on one H100, one JSON file and a short table.

    python bench/gpu.py                        # CUDA: out/gpu/gpu.json; exit status 1 if anything failed
    python bench/gpu.py --device cpu           # the same stages at toy sizes, in seconds (the tests run it)
    python bench/gpu.py --stages compile_ddpm  # only some stages, e.g. to run again one that failed

Stages, the cheapest correctness checks first. Each runs in subprocesses under a timeout; a failure is
recorded with its log's last lines and the run goes on; the JSON is rewritten after every stage.
  env          torch, CUDA, cuDNN, NCCL, the card and its bf16 dense peak (PEAK_BF16_TFLOPS)
  smoke        every script's --train --preset tiny, then its --sample, as a user runs them; on CUDA also
               ddpm.py --train --compile (the scripts' own torch.compile path)
  torchrun     torchrun --nproc_per_node 1 (nccl on CUDA, gloo on the CPU): ddpm.py --train for 20 steps,
               an all_reduce, then 20 DistributedDataParallel steps of the paper network
  train        common.train's step (forward, backward, clipping, fused AdamW, EMA) of ddpm.py's paper
               preset (35.7M, batch 128) and of ldm.py's cpu-preset latent model (with its frozen
               autoencoder's encoding) in fp32 (TF32) and bf16 autocast: img/s, TFLOP/s counted with
               torch.utils.flop_counter (as bench.py), MFU against the bf16 peak, peak memory; also what
               a large matrix product reaches, and the img/s of the shapes data
  sample       DDIM, 50 steps, batch 256: ddpm.py's paper network; ldm.py's with guidance and the decoder
  compile_*    the training step (and sampling) under torch.compile, compile time apart; the target is
               >= 40% MFU for the paper preset in bf16. Skipped on the CPU (inductor's C++ build: minutes)
A stage that no longer fits in --budget is skipped, and says so.
"""
import argparse
import copy
import gc
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402  (bench/bench.py, beside this file)
import common  # noqa: E402
import ddim  # noqa: E402
import ddpm  # noqa: E402
import ldm  # noqa: E402

# bf16 dense tensor-core peaks in TFLOP/s, for MFU: NVIDIA's data sheets, whose headline figures assume
# sparsity, halved. The first key that torch.cuda.get_device_name() contains wins, so specific names come
# first ("NVIDIA H100 80GB HBM3" is the SXM card; "NVIDIA GH200 480GB" holds "H200" and an H100-class GPU).
PEAK_BF16_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H200 NVL", 835), ("H100", 989), ("H200", 989),
                    ("A100", 312)]

# The sizes on CUDA; the CPU runs the same code at toy sizes, to prove the stages in seconds.
# Training steps are timed `reps` times, `calls` steps each, after `warmup` steps (and the first).
SIZES = {"cuda": dict(ddpm="paper", ldm="cpu", batch=128, sample_batch=256, steps=50, warmup=5, reps=5,
                     calls=10),
         "cpu": dict(ddpm="tiny", ldm="tiny", batch=4, sample_batch=4, steps=3, warmup=1, reps=2, calls=1)}
SCRIPTS = ["ddpm", "ddim", "guided", "ddgan", "ldm", "dreambooth"]


def peak_tflops(name):
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in name.lower()), None)


def write_json(path, obj):
    """Atomically: a run killed while writing leaves the previous complete file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def one_line(e):
    text = common.ANSI.sub("", str(e)).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


# ---------------------------------------------------------------------------------------------
# Workers: a process per stage (python bench/gpu.py --worker KIND), so that a timeout can kill it, a CUDA
# error cannot poison the next stage, and peak memory is the stage's own. A worker writes its results
# after every measurement: a stage killed half-way keeps what it measured.
# ---------------------------------------------------------------------------------------------

def sync(dev):
    if dev.type == "cuda":  # CUDA runs asynchronously: read the clock only once its queue is drained
        torch.cuda.synchronize(dev)


def timed(fn, dev, reps, calls=1):
    """Seconds per call of fn, over `reps` timings of `calls` calls each: (mean, spread = (max - min) / mean,
    fn's last result). Two figures closer than their spread are the same figure."""
    times = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn()
        sync(dev)
        times.append((time.perf_counter() - t0) / calls)
    mean = sum(times) / reps
    return mean, (max(times) - min(times)) / mean, out


def reset_peak(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_mb(dev):
    """CUDA: the most memory tensors held since reset_peak. CPU: the process's peak resident size so far,
    which cannot be reset (a coarse figure)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2 ** 20
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (2 ** 20 if sys.platform == "darwin" else 1024)  # macOS counts bytes


def matmul_tflops(dev, dtype):
    """TFLOP/s of a large square matrix product: what this card reaches, beside its data-sheet peak."""
    n, iters = (8192, 50) if dev.type == "cuda" else (256, 3)
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    return 2 * n ** 3 / timed(lambda: a @ b, dev, 1, iters)[0] / 1e12


def ldm_parts(preset, dev):
    """ldm.py's latent model, frozen autoencoder and conditioner as its --train builds them, with the
    vocabulary of the shapes captions (fresh weights: speed does not depend on them)."""
    cfg = dict(ldm.PRESETS[preset], scale_factor=1.0)
    data = common.ShapesData(cfg["image_size"], cfg["channels"])
    cfg["vocab"] = common.WordTokenizer.build(ldm.training_captions(data, 2000), cfg["max_len"]).vocab
    torch.manual_seed(0)
    ae = common.AutoencoderKL(ldm.ae_config(cfg)).to(dev).eval().requires_grad_(False)
    return cfg, common.LDM(cfg).to(dev), ae, ldm.Conditioner(cfg), data


def train_setup(name, size, dev):
    """(network, loss(net) -> scalar, what) on one real batch of shapes, with the script's own loss."""
    if name == "ddpm":
        cfg = ddpm.PRESETS[size["ddpm"]]
        x = next(common.batches(common.ShapesData(cfg["image_size"], cfg["channels"]), size["batch"], 0))[0]
        x = x.to(dev).contiguous(memory_format=torch.channels_last)
        diff = ddpm.diffusion_from(cfg, dev)
        torch.manual_seed(0)
        return common.build_unet(cfg).to(dev), lambda net: diff.loss(net, x), f"ddpm.py {size['ddpm']}"
    if name != "ldm":
        raise ValueError(f"unknown model {name}")
    cfg, model, ae, cond, data = ldm_parts(size["ldm"], dev)
    x, _, caps = next(common.batches(data, size["batch"], 0))
    x = x.to(dev)
    abar = common.on_device(dev)(ldm.alphas_cumprod(cfg))

    def loss(net):  # ldm.py's loss_fn: encode with the frozen autoencoder, tokenize, drop 10%, eq. 3
        with torch.no_grad():
            z0 = ldm.DiagonalGaussian(*ae.encode(x)).sample() * cfg["scale_factor"]
        return ldm.ldm_loss(net, z0.float(), cond.drop(cond(caps), cfg["p_uncond"]).to(dev), abar)
    return model, loss, f"ldm.py {size['ldm']} (latent)"


def dynamo_stats():
    """Graph breaks and graphs compiled: a break splits the network into graphs and costs speed."""
    from torch._dynamo.utils import counters
    return {"graph_breaks": sum(counters["graph_break"].values()),
            "graph_break_reasons": list(counters["graph_break"])[:5],
            "unique_graphs": counters["stats"].get("unique_graphs", 0)}


def measure_train(run, size, dev, peak):
    """common.train's step, on a fixed batch: img/s, TFLOP/s, MFU, peak memory (and compile time)."""
    if dev.type == "cuda":  # as common.train, where cuDNN's autotuner is off too unless a run asks for it
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = run.get("cudnn_benchmark", False)
    reset_peak(dev)
    model, loss, what = train_setup(run["model"], size, dev)
    model = model.to(memory_format=torch.channels_last).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = common.make_optimizer(model.parameters(), 1e-4, device=dev)
    amp = common.autocast(dev, run["dtype"])
    with amp, bench.flop_counter() as fc:  # on the plain network: the counter does not see into compiled code
        loss(model).backward()
    model.zero_grad(set_to_none=True)
    if run.get("compile"):
        from torch._dynamo.utils import counters
        torch._dynamo.reset()
        counters.clear()
    net = torch.compile(model) if run.get("compile") else model

    def step():
        with amp:
            out = loss(net)
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        common.ema_update(ema, model, 0.9999)
        return out

    t0 = time.perf_counter()
    step()
    sync(dev)
    first = time.perf_counter() - t0  # compiles forward and backward; cuBLAS and cuDNN set up
    for _ in range(size["warmup"]):
        step()
    step_s, spread, last = timed(step, dev, size["reps"], size["calls"])
    final = last.item()
    if not math.isfinite(final):
        steps = 1 + size["warmup"] + size["reps"] * size["calls"]
        raise FloatingPointError(f"loss {final} after {steps} steps")
    flops = fc.get_total_flops()
    r = {"what": what, "params_M": common.count_params(model) / 1e6, "batch": size["batch"],
         "img_s": size["batch"] / step_s, "step_ms": 1e3 * step_s, "spread": spread,
         "gflop_per_step": flops / 1e9,
         "tflops": flops / step_s / 1e12, "first_step_s": first, "peak_mem_mb": peak_mb(dev), "loss": final}
    if peak:
        r["mfu"] = r["tflops"] / peak
    if run.get("compile"):
        r.update(compile_s=first - step_s, **dynamo_stats())
    return r


def measure_sample(run, size, dev, peak):
    """DDIM (eta 0) at the sampling batch: ddpm.py's network in pixel space, or ldm.py's latent model with
    classifier-free guidance (one batched U-Net call for both predictions) and then the decoder."""
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    reset_peak(dev)
    B, S = size["sample_batch"], size["steps"]
    amp = common.autocast(dev, run["dtype"])
    if run["model"] == "ddpm":
        cfg = ddpm.PRESETS[size["ddpm"]]
        torch.manual_seed(0)
        model = common.build_unet(cfg).to(dev, memory_format=torch.channels_last).eval()  # as ddim.load
        abar = ddim.alphas_cumprod(cfg).tolist()
        shape = (B, cfg["channels"], cfg["image_size"], cfg["image_size"])

        def sample(net, steps):
            return ddim.ddim_sample(ddim.eps_model(net, abar), torch.randn(shape, device=dev), abar, steps)[0]
        what = f"ddpm.py {size['ddpm']}, DDIM"
    elif run["model"] == "ldm":
        cfg, model, ae, cond, data = ldm_parts(size["ldm"], dev)
        model.eval()
        c, null = cond(ldm.training_captions(data, B)).to(dev), cond.null(B).to(dev)
        abar, r = ldm.alphas_cumprod(cfg).tolist(), cfg["image_size"] // cfg["f"]

        def sample(net, steps):
            eps_fn = common.guided_eps_fn(net, c, null, ldm.DEFAULT_SCALE)
            z = common.sample_latents(eps_fn, torch.randn(B, cfg["z_ch"], r, r, device=dev), abar, steps)
            return ae.decode(z / cfg["scale_factor"])
        what = f"ldm.py {size['ldm']}, DDIM, guidance, decoder"
    else:
        raise ValueError(f"unknown model {run['model']}")
    net = torch.compile(model) if run.get("compile") else model
    with torch.inference_mode(), amp:
        with bench.flop_counter() as fc:
            sample(model, S)  # counts the FLOPs, and warms cuDNN up
        t0 = time.perf_counter()
        sample(net, 2)        # compiles, where asked
        sync(dev)
        first = time.perf_counter() - t0
        s, spread, x = timed(lambda: sample(net, S), dev, 2)
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite samples")
    r = {"what": what, "batch": B, "steps": S, "img_s": B / s, "s_per_batch": s, "spread": spread,
         "tflops": fc.get_total_flops() / s / 1e12, "peak_mem_mb": peak_mb(dev)}
    if peak:
        r["mfu"] = r["tflops"] / peak
    if run.get("compile"):
        r["compile_s"] = first
    return r


def worker_measure(args, dev, measure):
    """The runs of --spec, one after another: a failing run is recorded and the next one goes on."""
    size, spec = SIZES[dev.type], json.loads(args.spec)
    peak = peak_tflops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    out = {"runs": []}
    if spec.get("matmul"):
        out["matmul_tflops"] = {"bfloat16": matmul_tflops(dev, torch.bfloat16)}
        if dev.type == "cuda":  # TF32, which the scripts allow for fp32
            torch.backends.cuda.matmul.allow_tf32 = True
            out["matmul_tflops"]["float32 (TF32)"] = matmul_tflops(dev, torch.float32)
    if spec.get("data"):  # can the scripts' data loading, in the training process, feed this card?
        it = common.batches(common.ShapesData(32, 3), size["batch"], 0)
        next(it)
        t0 = time.perf_counter()
        for _ in range(3):
            next(it)
        out["shapes_data_img_s"] = 3 * size["batch"] / (time.perf_counter() - t0)
    write_json(args.result, out)
    for run in spec["runs"]:
        print(f"worker: {run}", flush=True)
        try:
            r = {**run, "ok": True, **measure(run, size, dev, peak)}
        except Exception as e:
            traceback.print_exc()
            r = {**run, "ok": False, "error": one_line(e)}
        print(f"worker: {r}", flush=True)
        out["runs"].append(r)
        write_json(args.result, out)
    return 0 if all(r["ok"] for r in out["runs"]) else 1


def worker_torchrun(args):
    """Under torchrun: ddpm.py --train through its own main (common.setup_distributed: nccl on CUDA, gloo on
    the CPU), then an all_reduce and DistributedDataParallel steps, which make NCCL really communicate (with
    one process, creating the process group alone sets up no NCCL communicator)."""
    import torch.distributed as dist
    cuda = args.device == "cuda"
    size, res = SIZES["cuda" if cuda else "cpu"], {}
    out = os.path.join(os.path.dirname(args.result), "torchrun_ddpm")
    t0 = time.perf_counter()
    ddpm.main(["--train", "--preset", "tiny", "--max-steps", "20", "--n-samples", "4", "--steps", "10",
               "--device", args.device, "--out", out])
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    res.update(ddpm_train_s=time.perf_counter() - t0, ddpm_checkpoint_step=ck["step"],
               backend=dist.get_backend(), world_size=dist.get_world_size())
    write_json(args.result, res)
    dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    ones = torch.ones(4, device=dev)
    dist.all_reduce(ones)
    res["all_reduce"] = ones.tolist()
    reset_peak(dev)
    cfg = ddpm.PRESETS[size["ddpm"]]
    torch.manual_seed(0)
    model = common.build_unet(cfg).to(dev, memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if cuda else None)
    opt = common.make_optimizer(model.parameters(), 1e-4, device=dev)
    diff, amp = ddpm.diffusion_from(cfg, dev), common.autocast(dev, "auto")
    x = torch.randn(size["batch"], 3, cfg["image_size"], cfg["image_size"], device=dev)
    x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with amp:
            loss = diff.loss(net, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients here, bucket by bucket
        opt.step()
    for _ in range(size["warmup"]):
        step()
    step_s = timed(step, dev, 1, 20)[0]
    res.update(ddp_what=f"ddpm.py {size['ddpm']}", ddp_dtype="bfloat16" if cuda else "float32", ddp_steps=20,
               ddp_batch=size["batch"], ddp_img_s=size["batch"] / step_s, ddp_peak_mem_mb=peak_mb(dev))
    write_json(args.result, res)
    dist.destroy_process_group()
    return 0


def worker(args):
    if args.worker == "torchrun":
        return worker_torchrun(args)
    measure = measure_train if args.worker == "train" else measure_sample
    return worker_measure(args, torch.device(args.device), measure)


# ---------------------------------------------------------------------------------------------
# The run: the stages in order, each under a timeout, the JSON rewritten after each
# ---------------------------------------------------------------------------------------------

def log_lines(path):
    """The non-empty lines of a log's last 64 kB, without colours or tqdm's carriage returns."""
    with open(path, errors="replace") as f:
        f.seek(max(0, os.path.getsize(path) - 64_000))
        lines = [common.ANSI.sub("", s).split("\r")[-1].rstrip() for s in f.read().splitlines()]
    return [s[:300] for s in lines if s.strip()]


def warnings_in(path):
    """The first distinct warnings of a log: on a new card PyTorch's say much (a kernel it did not use...)"""
    with open(path, errors="replace") as f:
        found = [s.strip()[:200] for s in f if re.search(r"warn", s, re.I)]
    return list(dict.fromkeys(found))[:5]


def error_line(lines, rc, seconds):
    """The line of a failed run's log that says what went wrong."""
    if rc is None:
        return f"timed out after {seconds:.0f}s"
    for s in reversed(lines):  # torchrun ends with its own ChildFailedError, after the worker's real one
        if (s.startswith("error:") or re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", s)) \
                and "ChildFailedError" not in s:
            return s
    return f"exit status {rc}" + (f": {lines[-1]}" if lines else "")


def run_cmd(cmd, log, timeout, env=None):
    """cmd from the repository root with its output in `log`; at the timeout it is killed together with its
    children (torchrun's worker, inductor's compile workers), which share its new session. Returns (exit
    status, None if it timed out; seconds; the log's lines)."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                             start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if p.poll() is None:  # timed out, or Ctrl-C here, which its own session does not receive
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return rc, time.monotonic() - t0, log_lines(log)


def smoke_plan(dev, out, scripts):
    """Lanes of (script, mode, argv, the file it must write): each script's --train --preset tiny, then its
    --sample, which a failed --train skips. A lane runs in order (dreambooth.py fine-tunes ldm.py's
    checkpoint, so it follows ldm.py); on CUDA the lanes run side by side. CUDA: the tiny presets as they
    are; the CPU: 2 steps, 2 images."""
    cpu = dev == "cpu"
    o = {s: os.path.join(out, "smoke", s) for s in SCRIPTS}
    n = ["--n-samples", "2" if cpu else "16"]
    few, steps = (["--max-steps", "2"], ["--steps", "2"]) if cpu else ([], [])

    def train(s, *extra):
        argv = [f"{s}.py", "--train", "--preset", "tiny", "--device", dev, "--out", o[s], *few, *n, *extra]
        return s, "train", argv, "ckpt.pt"

    def sample(s, *extra):
        return s, "sample", [f"{s}.py", "--sample", "--device", dev, "--out", o[s], *n, *extra], "samples.png"
    lanes = [[train("ddpm", *steps), sample("ddpm", *steps)],
             [train("ddim"), sample("ddim", *steps)],
             [train("guided", *steps, *(["--clf-steps", "2"] if cpu else [])), sample("guided", *steps)],
             [train("ddgan"), sample("ddgan")],
             [train("ldm", *steps, *(["--ae-steps", "2"] if cpu else [])),
              sample("ldm", *steps, "--prompt", "a large blue triangle on the right"),
              train("dreambooth", *steps, "--base", os.path.join(o["ldm"], "ckpt.pt"),
                    "--num-class-images", "2" if cpu else "8"),
              sample("dreambooth", *steps, "--prompt", "a blue sks circle on the left")]]
    if not cpu:  # the scripts' own --compile (common.train), beside the others (CPU: minutes of C++ builds)
        argv = train("ddpm", "--compile")[2]
        argv[argv.index("--out") + 1] = os.path.join(out, "smoke", "ddpm_compile")
        lanes.append([("ddpm", "train --compile", argv, "ckpt.pt")])
    keep = set(scripts) | ({"ldm"} if "dreambooth" in scripts else set())
    return [kept for kept in ([c for c in lane if c[0] in keep] for lane in lanes) if kept]


def stage_smoke(ctx, deadline):
    def lane_rows(lane):
        rows = []
        for script, mode, argv, made in lane:
            row = {"script": f"{script}.py", "mode": mode, "command": shlex.join(["python", *argv])}
            broken = [r for r in rows if r["mode"] == "train" and not r["ok"]]  # what the rest needs
            if broken:
                rows.append({**row, "ok": False, "error": f"not run: {broken[0]['script']} --train failed"})
                continue
            if deadline - time.monotonic() < 1:
                rows.append({**row, "ok": False, "error": "not run: the stage's time was up"})
                continue
            log = os.path.join(ctx.out, "logs", f"smoke_{script}_{mode.replace(' --', '_')}.log")
            t0 = time.time()
            rc, secs, lines = run_cmd([sys.executable, *argv], log, deadline - time.monotonic())
            path = os.path.join(argv[argv.index("--out") + 1], made)
            wrote = os.path.exists(path) and os.path.getmtime(path) >= t0 - 1  # this run's, not an older one
            row.update(ok=rc == 0 and wrote, seconds=round(secs, 1), log=os.path.relpath(log, ctx.out),
                       warnings=warnings_in(log))
            if rc != 0:
                row.update(error=error_line(lines, rc, secs), tail=lines[-20:])
            elif not wrote:
                row["error"] = f"exit status 0 but {path} was not written"
            verdict = "ok" if row["ok"] else "FAILED: " + row["error"]
            print(f"  {row['script']} --{mode}: {verdict} ({secs:.1f}s)", flush=True)
            rows.append(row)
        return rows
    lanes = smoke_plan(ctx.dev, ctx.out, ctx.scripts)
    with ThreadPoolExecutor(len(lanes) if ctx.dev == "cuda" else 1) as pool:
        rows = [row for lane in pool.map(lane_rows, lanes) for row in lane]
    failed = [f"{r['script']} --{r['mode']}: {r['error']}" for r in rows if not r["ok"]]
    return {"ok": not failed, "commands": rows, "failed": failed,
            **({"error": "; ".join(failed)} if failed else {})}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_worker(ctx, deadline, name, kind, spec=None, torchrun=False):
    """python bench/gpu.py --worker KIND (under torchrun where asked) as a stage: its results, and when it
    failed the log's verdict and last lines."""
    result = os.path.join(ctx.out, "results", f"{name}.json")
    log = os.path.join(ctx.out, "logs", f"{name}.log")
    if os.path.exists(result):
        os.remove(result)
    args = [os.path.abspath(__file__), "--worker", kind, "--device", ctx.dev, "--result", result,
            "--spec", json.dumps(spec or {})]
    env = {}
    if torchrun:  # 127.0.0.1 and a free port: no hostname lookup, no clash with another job's port 29500
        args = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
        env = {"NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN")}  # NCCL's own reason, into the log
    rc, secs, lines = run_cmd([sys.executable, *args], log, deadline - time.monotonic(), env)
    r = json.load(open(result)) if os.path.exists(result) else {}
    r.update(ok=rc == 0, log=os.path.relpath(log, ctx.out), warnings=warnings_in(log))
    if rc != 0:
        bad = [x for x in r.get("runs", []) if not x["ok"]]
        first = f"{bad[0]['error']} ({bad[0]['model']} {bad[0]['dtype']})" if bad and rc == 1 else None
        r.update(error=first or error_line(lines, rc, secs), tail=lines[-30:])
    return r


def stage_torchrun(ctx, deadline):
    r = stage_worker(ctx, deadline, "torchrun", "torchrun", torchrun=True)
    want = {"backend": "nccl" if ctx.dev == "cuda" else "gloo", "world_size": 1, "all_reduce": [1.0] * 4,
            "ddpm_checkpoint_step": 20}
    wrong = [f"{k} {r.get(k)} (expected {v})" for k, v in want.items() if r.get(k) != v]
    if r["ok"] and wrong:
        r.update(ok=False, error="; ".join(wrong))
    return r


def stage_env(ctx, deadline):
    e = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
         "cpu_count": os.cpu_count(), "platform": platform.platform(),
         "env": {k: v for k, v in os.environ.items()
                 if k.startswith(("CUDA_VISIBLE", "NCCL_", "OMP_", "TORCH"))}}
    try:  # which code the figures are of
        git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                             text=True)
        e["commit"] = git.stdout.strip() or None
    except OSError:
        e["commit"] = None
    if ctx.dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        e.update(name=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                 sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2 ** 30, 1),
                 device_count=torch.cuda.device_count())
        try:
            e["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as err:  # a build without NCCL: the torchrun stage will say more
            e["nccl"] = one_line(err)
    else:
        e["name"] = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    e["peak_bf16_tflops"] = peak_tflops(e["name"]) if ctx.dev == "cuda" else None
    if e["peak_bf16_tflops"] is None:
        e["note"] = "no bf16 peak known for this device (PEAK_BF16_TFLOPS): MFU left out"
    return {"ok": True, **e}


def stages(dev):
    """(name, function, its arguments, seconds it needs at least, its timeout), in the order they run:
    correctness first, then what the issue asks to measure, then the optional ones, which a tight budget
    drops first."""
    ddpm_, ldm_ = dict(model="ddpm"), dict(model="ldm")
    bf16, fp32, comp = dict(dtype="bfloat16"), dict(dtype="float32"), dict(compile=True)
    tuner = [{**ddpm_, **bf16, "cudnn_benchmark": True}] if dev == "cuda" else []  # would common.train gain?

    def w(name, kind, runs, need, cap, **spec):
        return name, stage_worker, dict(name=name, kind=kind, spec=dict(spec, runs=runs)), need, cap
    return [("env", stage_env, {}, 1, 30),
            ("smoke", stage_smoke, {}, 30, 240),
            ("torchrun", stage_torchrun, {}, 20, 120),
            w("train", "train", [{**ddpm_, **fp32}, {**ddpm_, **bf16}, *tuner, {**ldm_, **fp32},
                                 {**ldm_, **bf16}], 20, 120, matmul=True, data=True),
            w("sample", "sample", [{**ddpm_, **bf16}, {**ddpm_, **fp32}, {**ldm_, **bf16}], 15, 90),
            w("compile_ddpm", "train", [{**ddpm_, **bf16, **comp}], 60, 210),
            w("compile_ldm", "train", [{**ldm_, **bf16, **comp}], 45, 150),
            w("compile_ddpm_fp32", "train", [{**ddpm_, **fp32, **comp}], 60, 180),
            w("compile_sample", "sample", [{**ddpm_, **bf16, **comp}], 45, 120)]


STAGE_NAMES = [s[0] for s in stages("cpu")]


def targets(report):
    """The issue's targets: >= 40% MFU for the paper preset in bf16 under torch.compile; no script failing."""
    runs = [r for s in report["stages"].values() for r in s.get("runs", [])]
    paper = [r for r in runs if r["model"] == "ddpm" and r["dtype"] == "bfloat16" and r.get("compile")
             and "step_ms" in r]
    mfu = paper[0].get("mfu") if paper else None
    smoke = report["stages"].get("smoke", {})
    met = None if mfu is None else mfu >= 0.40
    return {"mfu_ddpm_bf16_compile": {"goal": 0.40, "value": mfu, "met": met},
            "no_script_failing": {"failed": smoke.get("failed"),
                                  "met": {"ok": True, "failed": False}.get(smoke.get("status"))}}


def print_table(report):
    def f(v, fmt, width):
        return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(width)
    st = report["stages"]
    print(f"\n{'stage':<18} {'status':<8} {'seconds':>7}  note")
    for name, s in st.items():
        note = s.get("error") or s.get("reason") or ""
        print(f"{name:<18} {s['status']:<8} {f(s.get('seconds'), '7.1f', 7)}  {note}")
    runs = [r for s in st.values() for r in s.get("runs", []) if r["ok"]]
    trains, samples = [r for r in runs if "step_ms" in r], [r for r in runs if "s_per_batch" in r]
    mm = st.get("train", {}).get("matmul_tflops", {})
    print(f"\n{st.get('env', {}).get('name', report['device'])}: bf16 peak "
          f"{f(st.get('env', {}).get('peak_bf16_tflops'), 'g', 1)} TFLOP/s; a large matrix product reached "
          + (", ".join(f"{v:.1f} ({k})" for k, v in mm.items()) or "-") + " TFLOP/s")
    if trains:
        print(f"{'training step':<30} {'dtype':<9} {'compile':<7} {'batch':>5} {'img/s':>8} {'spread':>6} "
              f"{'ms/step':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak MiB':>9} {'compile s':>9}")
    for r in trains:
        what = r["what"] + (" +cudnn.benchmark" if r.get("cudnn_benchmark") else "")
        print(f"{what:<30} {r['dtype']:<9} {'yes' if r.get('compile') else 'no':<7} {r['batch']:>5} "
              f"{r['img_s']:8.1f} {r['spread']:6.1%} {r['step_ms']:8.2f} {r['tflops']:8.2f} "
              f"{f(r.get('mfu'), '6.1%', 6)} "
              f"{r['peak_mem_mb']:9.0f} {f(r.get('compile_s'), '9.1f', 9)}")
    if samples:
        print(f"{'sampling':<36} {'dtype':<9} {'compile':<7} {'batch':>5} {'steps':>5} {'img/s':>8} "
              f"{'spread':>6} {'TFLOP/s':>8} {'MFU':>6} {'peak MiB':>9} {'compile s':>9}")
    for r in samples:
        print(f"{r['what']:<36} {r['dtype']:<9} {'yes' if r.get('compile') else 'no':<7} {r['batch']:>5} "
              f"{r['steps']:>5} {r['img_s']:8.1f} {r['spread']:6.1%} {r['tflops']:8.2f} "
              f"{f(r.get('mfu'), '6.1%', 6)} "
              f"{r['peak_mem_mb']:9.0f} {f(r.get('compile_s'), '9.1f', 9)}")
    t = st.get("torchrun", {})
    if "ddp_img_s" in t:
        print(f"torchrun: {t['backend']}, world size {t['world_size']}; DDP, {t['ddp_what']}, "
              f"{t['ddp_dtype']}, batch {t['ddp_batch']}: {t['ddp_img_s']:.1f} img/s, "
              f"peak {t['ddp_peak_mem_mb']:.0f} MiB")
    if "shapes_data_img_s" in st.get("train", {}):
        print(f"shapes data, drawn in the training process as the scripts do: "
              f"{st['train']['shapes_data_img_s']:.0f} img/s")
    for k, v in report["targets"].items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[v["met"]]
        value = f" ({v['value']:.1%})" if isinstance(v.get("value"), float) else ""
        print(f"target {k}: {verdict}{value}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto (default): cuda if available")
    p.add_argument("--out", default=os.path.join("out", "gpu"),
                   help="folder of gpu.json, logs/ and the smoke runs' outputs (default out/gpu)")
    p.add_argument("--budget", type=common.positive_float, default=450,
                   help="seconds for the whole run (default 450); a stage that no longer fits is skipped")
    p.add_argument("--stages", nargs="+", choices=STAGE_NAMES, help="only these stages (default: all)")
    p.add_argument("--scripts", nargs="+", choices=SCRIPTS, default=SCRIPTS, help="smoke: only these scripts")
    p.add_argument("--worker", choices=["train", "sample", "torchrun"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    t_start = time.monotonic()
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: CUDA is not available here; use --device cpu", file=sys.stderr)
        return 2
    ctx = argparse.Namespace(dev=dev, out=os.path.abspath(args.out), scripts=args.scripts)
    path = os.path.join(ctx.out, "gpu.json")
    for d in ("logs", "results"):
        os.makedirs(os.path.join(ctx.out, d), exist_ok=True)
    report = {"command": " ".join(["python bench/gpu.py", *(sys.argv[1:] if argv is None else argv)]),
              "device": dev, "sizes": SIZES[dev], "budget_s": args.budget,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "complete": False, "seconds": 0.0, "stages": {}}
    print(f"bench/gpu.py: device {dev}, budget {args.budget:g}s, writing {path}", flush=True)
    for name, fn, kw, need, cap in stages(dev):
        if args.stages and name not in args.stages:
            continue
        left = args.budget - (time.monotonic() - t_start)
        if name.startswith("compile") and dev == "cpu":
            entry = {"status": "skipped", "reason": "on the CPU: inductor's C++ build alone takes minutes"}
        elif left < need:
            entry = {"status": "skipped", "reason": f"budget: {left:.0f}s left, the stage needs {need}s"}
        else:
            timeout = min(cap, left)
            print(f"[{time.monotonic() - t_start:5.0f}s] {name} (timeout {timeout:.0f}s)", flush=True)
            t0 = time.monotonic()
            try:
                r = fn(ctx, t0 + timeout, **kw)
            except Exception as e:  # a bug of this file must not cost the stages after it
                r = {"ok": False, "error": one_line(e), "tail": traceback.format_exc().splitlines()[-8:]}
            ok = r.pop("ok")
            entry = {"status": "ok" if ok else "failed", "seconds": round(time.monotonic() - t0, 1),
                     "timeout_s": round(timeout), **r}
        report["stages"][name] = entry
        why = entry.get("error") or entry.get("reason")
        print(f"[{time.monotonic() - t_start:5.0f}s] {name}: {entry['status']}" + (f": {why}" if why else ""),
              flush=True)
        report.update(seconds=round(time.monotonic() - t_start, 1), targets=targets(report))
        write_json(path, report)
    report.update(complete=True, seconds=round(time.monotonic() - t_start, 1), targets=targets(report))
    write_json(path, report)
    print_table(report)
    failed = [f"{n} ({s['error']})" for n, s in report["stages"].items() if s["status"] == "failed"]
    print(f"wrote {path} in {report['seconds']:.0f}s" + (f"; FAILED: {'; '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
