"""
Timing benchmark for the papers' efficiency claims (not a test), on freshly initialized networks of each
script's preset (time does not depend on the weights), so it needs no checkpoint:

    python bench/compare.py                  # both comparisons, cpu presets, batch 32, 16 images sampled
    python bench/compare.py --only ldm       # LDM vs the pixel-space DDPM: training step and sampling time
    python bench/compare.py --only ddgan     # DDGAN (T = 4) vs DDPM (1000 steps) and DDIM (4 steps)

ldm: one training step (forward, backward, AdamW) of ldm.py's latent U-Net and text encoder, including
encoding the batch with the frozen autoencoder as ldm.py does, against ddpm.py's pixel U-Net at the same
image size; sampling: DDIM 50 steps with classifier-free guidance (conditional and unconditional in one
batch) and the decoder, against ddpm.py's ancestral sampler and DDIM 50 steps in pixel space.
ddgan: seconds per image for ddgan.py's generator in T = 4 and T = 1 steps, ddpm.py's 1000 ancestral steps
and DDIM's 4 and 50.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import ddgan  # noqa: E402
import ddim  # noqa: E402
import ddpm  # noqa: E402
import ldm  # noqa: E402


def timed(fn, iters, warmup=2):
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def pixel_model(preset):
    cfg = dict(ddpm.PRESETS[preset])
    torch.manual_seed(0)
    return common.build_unet(cfg).eval(), cfg


def ldm_model(preset):
    """ldm.py's stage-2 model and autoencoder with a vocabulary built from shapes captions."""
    cfg = dict(ldm.PRESETS[preset])
    data = common.load_data("shapes", cfg["image_size"], cfg["channels"])
    cfg["vocab"] = common.WordTokenizer.build(ldm.training_captions(data, 2000), cfg["max_len"]).vocab
    cfg["scale_factor"] = 1.0
    torch.manual_seed(0)
    ae = common.AutoencoderKL(ldm.ae_config(cfg)).eval()
    return common.LDM(cfg), ae, cfg, data


def train_step_fn(model, loss):
    opt = common.make_optimizer(model.parameters(), 1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def compare_ldm(args):
    unet, pcfg = pixel_model(args.preset)
    net, ae, cfg, data = ldm_model(args.preset)
    b, size = args.batch, cfg["image_size"]
    x = torch.stack([data[i][0] for i in range(b)])
    caps = [data[i][2] for i in range(b)]
    # float32 on the CPU, as ldm.py trains
    cond, abar = ldm.Conditioner(cfg), ldm.alphas_cumprod(cfg).float()
    abar_pix = ddim.alphas_cumprod(pcfg).tolist()
    unet.train()
    net.train()

    diff = ddpm.diffusion_from(pcfg, "cpu")

    def pixel_loss():  # ddpm.py's L_simple
        return diff.loss(unet, x)

    def latent_loss():  # ldm.py's loss_fn: encode with the frozen autoencoder, then eq. 3
        with torch.no_grad():
            z0 = ldm.DiagonalGaussian(*ae.encode(x)).sample() * cfg["scale_factor"]
        return ldm.ldm_loss(net, z0, cond.drop(cond(caps), cfg["p_uncond"]), abar)

    rows = [{"model": "ddpm.py pixel U-Net", "params_M": common.count_params(unet) / 1e6,
             "input": f"{pcfg['channels']}x{size}x{size}",
             "train_step_s": timed(train_step_fn(unet, pixel_loss), args.iters)},
            {"model": "ldm.py latent U-Net + text encoder", "params_M": common.count_params(net) / 1e6,
             "input": f"{cfg['z_ch']}x{size // cfg['f']}x{size // cfg['f']}",
             "train_step_s": timed(train_step_fn(net, latent_loss), args.iters)}]
    unet.eval()
    net.eval()
    n = args.n
    shape = (n, pcfg["channels"], size, size)
    with torch.inference_mode():
        t0 = time.perf_counter()
        diff.sample(unet, shape, "cpu")
        rows[0][f"sample_s_per_image_ddpm{pcfg['timesteps']}"] = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        ddim.ddim_sample(ddim.eps_model(unet, abar_pix), torch.randn(shape), abar_pix, 50)
        rows[0]["sample_s_per_image_ddim50"] = (time.perf_counter() - t0) / n
        c = cond([data[i][2] for i in range(n)])
        r = size // cfg["f"]
        t0 = time.perf_counter()
        eps_fn = common.guided_eps_fn(net, c, cond.null(n), 3.0)
        z = common.sample_latents(eps_fn, torch.randn(n, cfg["z_ch"], r, r), abar, 50)
        ae.decode(z / cfg["scale_factor"])
        rows[1]["sample_s_per_image_ddim50_cfg"] = (time.perf_counter() - t0) / n
    return rows


def compare_ddgan(args):
    unet, pcfg = pixel_model(args.preset)
    n, size = args.n, pcfg["image_size"]
    shape = (pcfg["channels"], size, size)
    abar = ddim.alphas_cumprod(pcfg).tolist()
    rows = []
    with torch.inference_mode():
        for T in (ddgan.PRESETS[args.preset]["timesteps"], 1):  # the paper's T and the one-step GAN
            gcfg = {**ddgan.PRESETS[args.preset], "timesteps": T}
            torch.manual_seed(0)
            G = ddgan.Generator(gcfg).eval()
            t0 = time.perf_counter()
            ddgan.sample(G, ddgan.schedule_from(gcfg, "cpu"), n, shape, "cpu")
            rows.append({"sampler": f"ddgan.py, T = {T}", "nfe": T, "params_M": common.count_params(G) / 1e6,
                         "s_per_image": (time.perf_counter() - t0) / n})
        for steps in (4, 50):
            t0 = time.perf_counter()
            ddim.ddim_sample(ddim.eps_model(unet, abar), torch.randn(n, *shape), abar, steps)
            rows.append({"sampler": f"ddim.py, {steps} steps", "nfe": steps,
                         "params_M": common.count_params(unet) / 1e6,
                         "s_per_image": (time.perf_counter() - t0) / n})
        t0 = time.perf_counter()
        ddpm.diffusion_from(pcfg, "cpu").sample(unet, (n, *shape), "cpu")
        rows.append({"sampler": f"ddpm.py, {pcfg['timesteps']} steps", "nfe": pcfg["timesteps"],
                     "params_M": common.count_params(unet) / 1e6,
                     "s_per_image": (time.perf_counter() - t0) / n})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["ldm", "ddgan"])
    p.add_argument("--preset", default="cpu", choices=["tiny", "cpu"])
    p.add_argument("--batch", type=int, default=32, help="training batch (the cpu presets' 32)")
    p.add_argument("--n", type=int, default=16, help="images per sampling run")
    p.add_argument("--iters", type=int, default=10, help="timed training steps")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}")
    out = {}
    if args.only in (None, "ldm"):
        out["ldm"] = compare_ldm(args)
    if args.only in (None, "ddgan"):
        out["ddgan"] = compare_ddgan(args)
    for k, rows in out.items():
        print(f"\n{k}:")
        for r in rows:
            cells = (f"{a} {v:.4g}" if isinstance(v, float) else f"{a} {v}" for a, v in r.items())
            print("  " + ", ".join(cells))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
