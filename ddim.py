"""
Denoising Diffusion Implicit Models (Song, Meng & Ermon, 2021), https://arxiv.org/abs/2010.02502

    python ddim.py --train                                              # the DDPM objective (eq. 5)
    python ddim.py --sample --ckpt out/ddpm/ckpt.pt --steps 50 --eta 0  # a ddpm.py checkpoint, as it is
    python ddim.py --sample --invert       # x_0 -> x_T -> x_0: reconstruction MSE/PSNR (Sec. 5.4)
    python ddim.py --sample --interpolate  # slerp between two x_T, decoded with eta = 0 (Sec. 5.3)
    python ddim.py --eval --sweep          # Table 1 at small scale: FID and sec/image over S x eta
    python ddim.py --sample --weights ddpm-cifar10-32 --steps 50   # DDPM's released model (README)

The paper writes alpha_t for what ddpm.py (and this file) calls abar_t = prod_{s<=t} (1 - beta_s).
Timesteps are 0-indexed as in ddpm.py; the network is the same, so are its checkpoints.

Forward marginal   q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)                             (eq. 4)
Objective          L_1 = E || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2
                   (eq. 5 with gamma = 1: DDPM's L_simple)
Predicted x_0      f_theta(x_t) = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)         (eq. 9)
Generalized step   x_s = sqrt(abar_s) f_theta(x_t) + sqrt(1 - abar_s - sigma^2) eps_theta(x_t, t) + sigma z
                   from t = tau_i to s = tau_{i-1} of a subsequence tau_1 < ... < tau_S of 0..T-1
                   (Sec. 4.2), and abar_s = 1 after tau_1, so the last step returns f_theta exactly (eq. 12)
Noise level        sigma(eta) = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)     (eq. 16)
                   eta = 1 is the DDPM posterior (variance beta~), eta = 0 the deterministic DDIM.
sigma-hat          sigma^ = sqrt(1 - abar_t / abar_s), more noise than eta = 1: DDPM's "large"
                   variance beta_t at S = T (Sec. 5.1; x_0 clipped, as in the official code).
Clipping           x0_hat clipped to [-1, 1] (and eps re-derived) when sampling, as ddpm.py does;
                   --no-clip for the official DDIM sampler, which does not clip (sigma-hat always clips).
Inversion          the eta = 0 step run from x_0 up to x_T: Euler steps of the ODE of eqs. 13-14
                   forward in time (Sec. 4.3), for reconstruction (Sec. 5.4).
Interpolation      slerp(z_0, z_1, a) = sin((1 - a) th) / sin(th) z_0 + sin(a th) / sin(th) z_1,
                   cos(th) = <z_0, z_1> / (|z_0| |z_1|), each x_T decoded with eta = 0 (Sec. 5.3).
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import common

PRESETS = common.DDPM_PRESETS   # Song et al. 2021 sample DDPM's networks, trained as DDPM trains them
DEFAULT_STEPS = 50
GIF_FRAMES = 20   # snapshots of x_t and of the x_0 predictions in the GIFs
SWEEP_STEPS = [10, 20, 50, 100, 1000]
SWEEP_SAMPLERS = [("eta=0", 0.0, False), ("eta=0.5", 0.5, False), ("eta=1", 1.0, False),
                  ("sigma-hat", 1.0, True)]


#################################################################################
#         The paper's maths: the generalized step, its noise, inversion         #
#################################################################################
# The network is DDPM's (common.UNet); ddpm.py's checkpoints and released weights sample here as they are.

alphas_cumprod = common.alphas_cumprod   # abar_t of the checkpoint's schedule: the paper's alpha_t


def q_sample(x0, t, eps, abar):
    """eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, for a batch of timesteps t (B,)."""
    a = common.extract(abar, t, x0.shape)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def loss_simple(model, x0, abar):
    """eq. 5 with gamma = 1 (DDPM's L_simple): t ~ U{0..T-1}, eps ~ N(0, I), MSE on eps. Theorem 1:
    the same objective trains every sampler below, so the sampler is chosen after training."""
    t = torch.randint(0, len(abar), (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    return F.mse_loss(model(q_sample(x0, t, eps, abar), t).float(), eps)


def predict_x0(x, eps, a):
    """eq. 9: f_theta(x_t) = (x_t - sqrt(1 - abar_t) eps_theta(x_t)) / sqrt(abar_t), with a = abar_t."""
    return (x - (1 - a) ** 0.5 * eps) / a ** 0.5


def ddim_sigma(a, a_prev, eta):
    """eq. 16: sigma(eta) = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s), a = abar_t,
    a_prev = abar_s. eta = 1 gives DDPM's posterior variance beta~ on the subsequence; eta = 0, none."""
    return eta * ((1 - a_prev) / (1 - a)) ** 0.5 * (1 - a / a_prev) ** 0.5


def sigma_hat(a, a_prev):
    """Sec. 5.1: sigma^ = sqrt(1 - abar_t / abar_s), the larger noise of DDPM's CIFAR-10 samples
    (beta_t when every step is taken)."""
    return (1 - a / a_prev) ** 0.5


def ddim_step(x, eps, a, a_prev, sigma, noise_std=None, clip=False, noise=None):
    """eq. 12: x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps + noise_std z, where
    noise_std = sigma unless given (sigma-hat keeps the eta = 1 mean and only adds more noise).
    With clip, x0_hat is clipped to [-1, 1] and eps re-derived from it, so x0_hat and eps stay
    consistent with x_t (then eta = 1 is exactly DDPM's clipped posterior mean). a_prev < a runs
    the step backwards in noise level, towards x_T (inversion). Returns (x_s, x0_hat)."""
    x0 = predict_x0(x, eps, a)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5
    x_prev = a_prev ** 0.5 * x0 + max(0.0, 1 - a_prev - sigma ** 2) ** 0.5 * eps
    std = sigma if noise_std is None else noise_std
    if std > 0:
        x_prev = x_prev + std * (torch.randn_like(x) if noise is None else noise)
    return x_prev, x0


def timestep_subsequence(T, S, skip="uniform"):
    """The timesteps tau_1 < ... < tau_S (Sec. 4.2, App. D.2), sorted, unique, starting at t = 0,
    as the official code picks them: "uniform" tau_i = floor(i T / S), i = 0..S-1 (range(0, T, T/S)
    when S divides T); "quad" tau_i = floor((i sqrt(0.8 T) / (S - 1))^2), the paper's CIFAR-10 choice,
    nudged apart where rounding repeats a step (large S) and kept below T."""
    if not 1 <= S <= T:
        raise common.UserError(f"--steps {S}: use 1..{T}, the model's number of timesteps T")
    if skip == "uniform":
        return [i * T // S for i in range(S)]
    if skip != "quad":
        raise common.UserError(f"--skip {skip}: use uniform or quad")
    ts = (np.linspace(0, math.sqrt(0.8 * T), S) ** 2).astype(np.int64).tolist()
    for i in range(1, S):                     # strictly increasing ...
        ts[i] = max(ts[i], ts[i - 1] + 1)
    return [min(t, T - S + i) for i, t in enumerate(ts)]  # ... and room for every step below T


@torch.inference_mode()
def ddim_sample(eps_fn, x, abar, S, eta=0.0, skip="uniform", use_sigma_hat=False, clip=False, frames=0,
                progress=False):
    """Sampling with eq. 12 over the subsequence of S steps, from x = x_T: eps_fn(x, t) -> eps for an
    int t. sigma(eta) (eq. 16) or sigma-hat (Sec. 5.1, x_0 clipped). The last step goes to abar = 1
    and returns x0_hat. Returns x_0 and `frames` snapshots of (x_t, x0_hat) for a GIF."""
    ts = timestep_subsequence(len(abar), S, skip)
    keep = set(np.linspace(0, S - 1, frames).round().astype(int).tolist()) if frames else set()
    traj = []
    for i in common.steps_bar(reversed(range(S)), S, f"DDIM {S} steps", progress):
        t = ts[i]
        a, a_prev = float(abar[t]), float(abar[ts[i - 1]]) if i > 0 else 1.0
        sigma = ddim_sigma(a, a_prev, 1.0 if use_sigma_hat else eta)
        std = sigma_hat(a, a_prev) if use_sigma_hat and i > 0 else None  # no noise into x_0
        x, x0 = ddim_step(x, eps_fn(x, t), a, a_prev, sigma, std, clip or use_sigma_hat)
        if S - 1 - i in keep:
            traj.append((x.float().cpu(), x0.float().cpu()))
    return x, traj


@torch.inference_mode()
def ddim_invert(eps_fn, x0, abar, S, skip="uniform", progress=False):
    """DDIM inversion (Sec. 4.3, 5.4): the eta = 0 step of eq. 12 run forward, x_0 -> x_tau_1 -> ... ->
    x_tau_S ~ x_T, with eps taken at the current point (an Euler step of the ODE, eq. 14). From x_0
    (abar = 1) the network is asked at tau_1, the nearest timestep it knows."""
    ts = timestep_subsequence(len(abar), S, skip)
    x = x0
    for i in common.steps_bar(range(S), S, f"DDIM inversion {S} steps", progress):
        a, t = (float(abar[ts[i - 1]]), ts[i - 1]) if i > 0 else (1.0, ts[0])
        x, _ = ddim_step(x, eps_fn(x, t), a, float(abar[ts[i]]), 0.0)
    return x


def slerp(z0, z1, alpha):
    """Spherical interpolation between two noises (Sec. 5.3): it keeps |z| near sqrt(d), where
    N(0, I) puts its mass, where linear interpolation would shrink it. z0, z1: (B, ...)."""
    a, b = z0.flatten(1), z1.flatten(1)
    theta = torch.arccos((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(min=1e-6)
    theta = theta.view(-1, *([1] * (z0.ndim - 1)))
    return (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / torch.sin(theta)


def eps_model(net, abar, objective="eps"):
    """eps_theta(x, t) for an int t, from a network that predicts eps, x_0 or v = sqrt(abar) eps -
    sqrt(1 - abar) x_0 (ddpm.py --objective), converted with x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps."""
    if objective not in ("eps", "x0", "v"):
        raise common.UserError(f"checkpoint objective '{objective}': ddim.py samples eps, x0 or v networks")

    def eps_fn(x, t):
        out = net(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).float()
        a = float(abar[t])
        if objective == "x0":
            return (x - a ** 0.5 * out) / (1 - a) ** 0.5
        return (1 - a) ** 0.5 * x + a ** 0.5 * out if objective == "v" else out
    return eps_fn


#################################################################################
#                                    Training                                   #
#################################################################################

def objective(cfg, device):
    """common.train's objective: L_1 (eq. 5) and the grids' sampler (eq. 12, eta = 0)."""
    abar = alphas_cumprod(cfg)
    abar_dev, abar_list = common.on_device(device)(abar), abar.tolist()
    S = min(DEFAULT_STEPS, len(abar_list))

    def sample_fn(ema, n):
        x_T = torch.randn(n, cfg["channels"], cfg["image_size"], cfg["image_size"], device=device)
        return ddim_sample(eps_model(ema, abar_list), x_T, abar_list, S, clip=True)[0]
    return (lambda net, x, y, caps: loss_simple(net, x, abar_dev)), sample_fn


#################################################################################
#        Sampling: grids, inversion (Sec. 5.4), interpolation (Sec. 5.3)        #
#################################################################################

def load(path, device):
    """The EMA network of a ddim.py or ddpm.py checkpoint, its abar (T Python floats) and the checkpoint."""
    ck = common.load_checkpoint(path, ["ddim", "ddpm"])
    model = common.build_unet(ck["config"])
    common.load_state(model, ck["ema"], path)
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model, alphas_cumprod(ck["config"]).tolist(), ck


def load_weights(args, device):
    """--weights: DDPM's released models (the diffusers ports, google/ddpm-*), the network this paper samples
    from (Sec. 5 uses DDPM's CIFAR-10 model as it is) -> network, abar, a checkpoint-like dict."""
    cfg, model, what = common.load_released_ddpm(args, "ddim")
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model, alphas_cumprod(cfg).tolist(), {"config": cfg, "script": "released", "step": None,
                                                 "weights": what}


def load_model(args, device):
    """--sample's and --eval's eps_theta (eps_model) of --weights, else of the --ckpt (default <out>/ckpt.pt)
    of ddim.py or ddpm.py -> (eps_fn, abar, config, checkpoint, the steps S (--steps, else 50))."""
    model, abar, ck = load_weights(args, device) if args.weights else load(
        args.ckpt or os.path.join(args.out, "ckpt.pt"), device)
    S = args.steps or DEFAULT_STEPS
    if not args.sweep:
        timestep_subsequence(len(abar), S, args.skip)  # a bad --steps fails before any work
    return eps_model(model, abar, ck["config"].get("objective", "eps")), abar, ck["config"], ck, S


def source(ck):
    """Where the network came from, for the messages."""
    if ck.get("weights"):
        return f"released weights {ck['weights']}"
    return f"{ck['script']}.py checkpoint at step {ck['step']}"


def sample_images(args, device):
    """--sample: a grid of samples and GIFs of x_t and of the x0 predictions along the way (or --invert,
    --interpolate)."""
    if args.invert:
        return invert_images(args, device)
    if args.interpolate:
        return interpolate_images(args, device)
    eps_fn, abar, c, ck, S = load_model(args, device)
    torch.manual_seed(args.seed)
    x_T = torch.randn(args.n_samples or 64, c["channels"], c["image_size"], c["image_size"], device=device)
    frames = 0 if args.no_gif else min(S, GIF_FRAMES)
    with common.autocast(device, args.dtype):
        x, traj = ddim_sample(eps_fn, x_T, abar, S, args.eta or 0.0, args.skip, args.sigma_hat,
                              not args.no_clip, frames=frames, progress=True)
    paths = [os.path.join(args.out, f) for f in ("samples.png", "reverse.gif", "x0_pred.gif")]
    common.save_grid(x, paths[0])
    if args.no_gif:
        paths = paths[:1]
    else:
        common.save_gif([xt for xt, _ in traj], paths[1])
        common.save_gif([x0 for _, x0 in traj], paths[2])
    noise = "sigma-hat" if args.sigma_hat else f"eta {args.eta or 0.0:g}"
    unclipped = ", unclipped" if args.no_clip and not args.sigma_hat else ""
    print(f"{S} steps ({args.skip}), {noise}{unclipped}, {source(ck)}: wrote {', '.join(paths)}")


def invert_images(args, device):
    """--sample --invert: DDIM-invert held-out images, decode the latents again with eta = 0."""
    eps_fn, abar, c, ck, S = load_model(args, device)
    held = common.load_data(args.data, c["image_size"], c["channels"], train=False)
    n = args.n_samples or 16
    if not held.endless and n > len(held):
        raise common.UserError(f"--n-samples {n}: --data {args.data} holds {len(held)} held-out images")
    x0 = torch.stack([held[i][0] for i in range(n)]).to(device)
    with common.autocast(device, args.dtype):
        x_T = ddim_invert(eps_fn, x0, abar, S, args.skip, progress=True)
        rec, _ = ddim_sample(eps_fn, x_T, abar, S, 0.0, args.skip, progress=True)
    mse = ((rec.float().clamp(-1, 1) - x0) / 2).square().mean().item()  # per dimension, on [0, 1] pixels
    res = {"script": "ddim", "mode": "invert", "steps": S, "skip": args.skip, "n": n, "mse": mse,
           "psnr": 10 * math.log10(1 / max(mse, 1e-12)), "latent_mean": x_T.mean().item(),
           "latent_std": x_T.std().item()}
    path = os.path.join(args.out, "invert.png")
    pairs = torch.stack([x0.cpu(), rec.float().cpu()], 1).flatten(0, 1)  # real, reconstruction, real, ...
    common.save_grid(pairs, path, nrow=8)
    print(f"DDIM inversion of {n} held-out images at {S} steps: reconstruction MSE {mse:.6f} "
          f"(pixels in [0, 1]), PSNR {res['psnr']:.2f} dB, latent mean {res['latent_mean']:.3f} std "
          f"{res['latent_std']:.3f}; pairs real | reconstruction in {path}")
    print(json.dumps(res))
    return res


def interpolate_images(args, device):
    """--sample --interpolate: rows of slerp(z_0, z_1, a) for a in [0, 1], decoded with eta = 0."""
    eps_fn, abar, c, ck, S = load_model(args, device)
    rows, cols = args.n_samples or 4, 11
    torch.manual_seed(args.seed)
    shape = (rows, c["channels"], c["image_size"], c["image_size"])
    z0, z1 = torch.randn(shape, device=device), torch.randn(shape, device=device)
    alphas = torch.linspace(0, 1, cols).tolist()
    z = torch.stack([slerp(z0, z1, a) for a in alphas], 1).flatten(0, 1)  # row-major: (rows * cols, ...)
    with common.autocast(device, args.dtype):
        x, _ = ddim_sample(eps_fn, z, abar, S, 0.0, args.skip, clip=not args.no_clip, progress=True)
    x = x.float().cpu().view(rows, cols, *shape[1:])
    grid, gif = os.path.join(args.out, "interpolate.png"), os.path.join(args.out, "interpolate.gif")
    common.save_grid(x.flatten(0, 1), grid, nrow=cols)
    if not args.no_gif:
        there_and_back = list(range(cols)) + list(range(cols - 2, 0, -1))
        common.save_gif([x[:, k] for k in there_and_back], gif, duration=120)
    step = (x[:, 1:] - x[:, :-1]).square().flatten(2).mean(2).sqrt()  # RMS change between neighbours
    print(f"slerp between {rows} pairs of noises, {cols} points each, {S} DDIM steps: RMS change between "
          f"neighbours mean {step.mean():.4f}, max {step.max():.4f}; wrote {grid} and {gif}")


#################################################################################
#                       Evaluation: Table 1 at small scale                      #
#################################################################################

def evaluate(args, device):
    """--eval: FID/KID on common.py's judge for one sampler, or with --sweep the paper's Table 1 grid (S x
    eta, and sigma-hat) and its consistency (Sec. 5.2)."""
    eps_fn, abar, c, ck, S = load_model(args, device)
    shape = (c["channels"], c["image_size"], c["image_size"])

    def run(S, eta, use_sigma_hat, keep=None):
        timestep_subsequence(len(abar), S, args.skip)

        def sample_fn(n, wanted):
            with common.autocast(device, args.dtype):
                x = ddim_sample(eps_fn, torch.randn(n, *shape, device=device), abar, S, eta, args.skip,
                                use_sigma_hat, not args.no_clip)[0]
            if keep is not None:
                keep.append(x.float().cpu())
            return x

        info = {"steps": S, "eta": None if use_sigma_hat else eta, "sigma_hat": use_sigma_hat,
                "skip": args.skip, "clip": not args.no_clip or use_sigma_hat, "ckpt_script": ck["script"],
                "ckpt_step": ck["step"], **({"weights": ck["weights"]} if ck.get("weights") else {})}
        return common.evaluate("ddim", args, c, sample_fn, nfe=S, device=device, info=info)

    if not args.sweep:
        return run(S, args.eta or 0.0, args.sigma_hat)
    steps = [S for S in SWEEP_STEPS if S <= len(abar)]
    eta0 = {}   # eta = 0's samples at each S, from the same x_T

    def cell(setting):
        (name, eta, use_sigma_hat), S = setting
        keep = [] if name == "eta=0" else None
        row = {"sampler": name, **run(S, eta, use_sigma_hat, keep)}
        if keep is not None:
            eta0[S] = torch.cat(keep)
        return row

    settings = [(sampler, S) for sampler in SWEEP_SAMPLERS for S in steps]
    rows = common.sweep(args, settings, cell, lambda s: f"{s[0][0].replace('=', '')}_S{s[1]}")
    # DDIM's consistency (Sec. 5.2): with eta = 0 the same x_T gives nearly the same image at any S
    for r in rows:
        if r["sampler"] == "eta=0":
            r["rms_to_max_steps"] = (eta0[r["steps"]] - eta0[max(eta0)]).square().mean().sqrt().item()
    n = rows[0]["n_samples"]
    print(f"\nDDIM Table 1 at small scale ({n} samples per cell, judge FID, skip {args.skip}; real-vs-real "
          f"floor {rows[0].get('fid_floor', math.nan):.2f}):")
    for title, key, fmt in (("FID", "fid", "{:.2f}"), ("KID", "kid", "{:.4f}"),
                            ("sec/image", "sec_per_image", "{:.3f}")):
        common.cross_table(rows, title, "sampler", "steps", key, fmt)
    consistency = ", ".join(f"S={r['steps']}: {r['rms_to_max_steps']:.4f}" for r in rows
                            if r["sampler"] == "eta=0")
    print(f"\neta=0, RMS distance (pixels in [-1, 1]) to the S={max(steps)} image from the same x_T: "
          f"{consistency}\n")
    common.print_sweep("ddim", rows, n)
    return rows


#################################################################################
#                                  Command line                                 #
#################################################################################

def main(argv=None):
    p = common.make_parser("ddim", __doc__, PRESETS, gifs=True, weights=(
        "DDPM's CIFAR-10, CelebA-HQ and LSUN models as diffusers folders (google/ddpm-cifar10-32, "
        "google/ddpm-church-256, ...)"))
    p.add_argument("--eta", type=common.unit_float,
                   help="sigma(eta) of eq. 16 in [0, 1]: 0 deterministic DDIM (default), 1 DDPM-like")
    p.add_argument("--skip", default="uniform", choices=["uniform", "quad"],
                   help="timestep subsequence: uniform (default) or quad (the paper's CIFAR-10 choice)")
    p.add_argument("--sigma-hat", action="store_true", excludes="--eta", help="the larger noise sigma^ = "
                   "sqrt(1 - abar_t / abar_s) of Sec. 5.1 (x_0 clipped), instead of sigma(eta)")
    p.add_argument("--no-clip", action="store_true",
                   help="do not clip x0_hat to [-1, 1] (clipped by default, as in ddpm.py; the official DDIM "
                        "sampler does not clip, which small models do not survive)")
    p.add_argument("--invert", action="store_true", goes_with="--sample", excludes="--interpolate",
                   help="DDIM-invert --n-samples (16) held-out images, regenerate them, report "
                        "reconstruction MSE/PSNR, write real | reconstruction")
    p.add_argument("--interpolate", action="store_true", goes_with="--sample", help="slerp between "
                   "--n-samples (4) pairs of noises, decoded with eta = 0, as a grid and a GIF")
    p.add_argument("--sweep", action="store_true", goes_with="--eval",
                   excludes=("--steps", "--eta", "--sigma-hat"),
                   help="FID and sec/image for S in {10, 20, 50, 100, 1000} x eta in {0, 0.5, 1} and "
                        "sigma-hat (Table 1); --n-samples per cell")
    args = p.parse_args(argv)
    common.check_weights_flags(args)
    cfg = None if args.weights else common.make_config(args, PRESETS)
    return common.run(args, lambda: common.train("ddim", args, cfg, common.build_unet, objective),
                      sample_images, evaluate)


if __name__ == "__main__":
    common.main_guard(main)
