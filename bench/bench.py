"""
Throughput benchmark (not a test): training images/s, seconds per network evaluation, achieved
GFLOP/s and its fraction of this device's measured matrix-product ceiling, and sampling images/s.

    python bench/bench.py                       # ddpm.py's cpu preset and the 35.7M paper U-Net
    python bench/bench.py --device cuda         # bf16 autocast, channels_last, fused AdamW
    python bench/bench.py --presets tiny cpu --batch 16 --iters 5

FLOPs are counted with torch.utils.flop_counter on one real training step (forward + backward);
attention through F.scaled_dot_product_attention is added with its own formula where the
counter has none (the CPU kernel). The ceiling is a large matrix product timed in the same run.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import ddim  # noqa: E402
import ddpm  # noqa: E402


def sdpa_flops(q_shape, k_shape, *args, **kwargs):
    b, h, n, d = q_shape
    return 4 * b * h * n * k_shape[-2] * d  # QK^T and PV, 2 FLOPs per multiply-add


def flop_counter():
    """FlopCounterMode (matrix products, convolutions, attention) that also counts the CPU's fused
    attention kernel, for which torch has no formula (its CUDA kernels have one)."""
    ops = {}
    cpu_attn = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attn is not None:
        ops[cpu_attn] = lambda q, k, *a, **kw: sdpa_flops(q, k)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if bwd is not None:
        ops[bwd] = lambda grad_out, q, k, *a, **kw: 2 * sdpa_flops(q, k)
    return FlopCounterMode(display=False, custom_mapping=ops)


def count_train_flops(model, x, t):
    with flop_counter() as fc:
        F.mse_loss(model(x, t).float(), x).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(device, dtype, n=4096, iters=10):
    """GFLOP/s of a large square matrix product: the practical ceiling of this device."""
    if device.type == "cpu":
        n, iters = 2048, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e9


def bench_model(name, cfg, device, amp, batch, iters, compile_):
    torch.manual_seed(0)
    model = common.build_unet(cfg).to(device).to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_ else model
    opt = common.make_optimizer(model.parameters(), 1e-4, device=device)
    size, ch = cfg["image_size"], cfg["channels"]
    x = torch.randn(batch, ch, size, size, device=device).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), device=device)
    with amp:
        flops = count_train_flops(model, x, t)

    def train_step():
        with amp:
            loss = F.mse_loss(net(x, t).float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()

    for _ in range(3):
        train_step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        train_step()
    sync(device)
    step_s = (time.perf_counter() - t0) / iters

    x16, t16 = x[:16], t[:16]
    with torch.inference_mode(), amp:
        for _ in range(3):
            net(x16, t16)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            net(x16, t16)
        sync(device)
    eval_s = (time.perf_counter() - t0) / iters
    return {"name": name, "params_M": common.count_params(model) / 1e6, "batch": batch,
            "train_img_s": batch / step_s, "step_s": step_s, "gflop_per_step": flops / 1e9,
            "gflops": flops / step_s / 1e9, "eval_s_b16": eval_s}


def bench_sampling(cfg, device, amp, n=16):
    """Images/s of ddpm.py's ancestral sampler with all T steps and of ddim.py's sampler with 50
    steps, both under torch.inference_mode, for a network of this config."""
    torch.manual_seed(0)
    model = common.build_unet(cfg).to(device).eval()
    diff = ddpm.diffusion_from(cfg, device)
    shape = (n, cfg["channels"], cfg["image_size"], cfg["image_size"])
    with amp:
        t0 = time.perf_counter()
        diff.sample(model, shape, device)
        sync(device)
        ddpm_s = time.perf_counter() - t0
        abar = ddim.alphas_cumprod(cfg).tolist()
        t0 = time.perf_counter()
        ddim.ddim_sample(ddim.eps_model(model, abar), torch.randn(shape, device=device), abar, 50)
        sync(device)
        ddim_s = time.perf_counter() - t0
    return {"ddpm_img_s": n / ddpm_s, "ddpm_steps": diff.T, "ddim50_img_s": n / ddim_s}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["cpu", "paper"], help="ddpm.py presets to time")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--sampling", action="store_true", help="also time DDPM sampling of the cpu preset")
    args = p.parse_args()
    device = common.get_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = common.autocast(device, args.dtype)
    low = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    ceiling = matmul_ceiling(device, torch.bfloat16 if low else torch.float32)
    print(f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"{'bf16 autocast' if low else 'fp32'}; matmul ceiling {ceiling:.0f} GFLOP/s")
    print(f"{'model':<8} {'params':>8} {'batch':>5} {'train img/s':>11} {'GFLOP/step':>10} "
          f"{'GFLOP/s':>8} {'of ceiling':>10} {'s/eval@16':>9}")
    for name in args.presets:
        r = bench_model(name, ddpm.PRESETS[name], device, amp, args.batch, args.iters, args.compile)
        print(f"{name:<8} {r['params_M']:>7.2f}M {r['batch']:>5} {r['train_img_s']:>11.1f} "
              f"{r['gflop_per_step']:>10.1f} {r['gflops']:>8.1f} {r['gflops'] / ceiling:>10.1%} "
              f"{r['eval_s_b16']:>9.4f}")
    if args.sampling:
        s = bench_sampling(ddpm.PRESETS["cpu"], device, amp)
        print(f"sampling (cpu preset, batch 16): DDPM {s['ddpm_steps']} steps {s['ddpm_img_s']:.3f} img/s; "
              f"DDIM 50 steps {s['ddim50_img_s']:.2f} img/s")


if __name__ == "__main__":
    main()
