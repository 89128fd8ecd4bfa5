"""
Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel, 2020), https://arxiv.org/abs/2006.11239

    python ddpm.py --train                              # shapes, a few minutes on a laptop CPU
    python ddpm.py --sample --ckpt out/ddpm/ckpt.pt     # PNG grid + GIF of the reverse process
    python ddpm.py --eval                               # FID/KID (see common.py), JSON last line
    python ddpm.py --sample --weights ddpm-cifar10-32   # the paper's released CIFAR-10 model (README)

Forward process  q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)                    (eq. 4)
Posterior        q(x_{t-1} | x_t, x_0) = N(mu~_t(x_t, x_0), beta~_t I)                 (eqs. 6-7)
Loss             L_simple = E_{t, x_0, eps} || eps - eps_theta(x_t, t) ||^2             (eq. 14)
Sampling         Algorithm 2, with sigma_t^2 = beta_t ("large") or beta~_t ("small").
Timesteps are 0-indexed: t = 0 is one noising step, t = T - 1 is (almost) pure noise.
"""
import os

import torch
import torch.nn.functional as F

import common

# tiny (seconds, for tests), cpu (the default: minutes on a 2-core CPU) and paper (Ho et al. 2020, CIFAR-10,
# Appendix B: 35.7M parameters, lr 2e-4, batch 128, 800K steps); in common.py because ddim.py shares them
PRESETS = common.DDPM_PRESETS
GIF_FRAMES = 20   # snapshots of the reverse process in reverse.gif


#################################################################################
#      The paper's maths: forward process, posterior, L_simple, Algorithm 2     #
#################################################################################
# The network is common.UNet (Appendix B: the PixelCNN++ U-Net with self-attention at 16 x 16).

class Diffusion:
    """The fixed forward process and everything derived from its betas, computed in float64 and kept as
    float32 on `device` (common.on_device; device None keeps float64 for the tests of the math).
    timestep_map[i] is the original timestep of step i, which the network is called with when sampling
    (the identity unless respaced)."""

    def __init__(self, betas, objective="eps", var="large", device=None, timestep_map=None):
        b = torch.as_tensor(betas, dtype=torch.float64)   # stays float64 on the CPU: respace derives from it
        keep = common.on_device(device)
        self.T, self.objective, self.var, self.device, self.betas = len(b), objective, var, device, b
        tmap = torch.arange(self.T) if timestep_map is None else torch.as_tensor(timestep_map)
        self.timestep_map = tmap if device is None else tmap.to(device)
        alphas = 1 - b
        abar = torch.cumprod(alphas, 0)                                       # abar_t = prod_{s<=t} alpha_s
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        # eq. 7: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
        post_var = b * (1 - abar_prev) / (1 - abar)
        self.alphas, self.abar, self.abar_prev, self.post_var = map(keep, (alphas, abar, abar_prev, post_var))
        self.post_c0 = keep(b * abar_prev.sqrt() / (1 - abar))               # eq. 7: mu~_t = c0 x_0 + ct x_t
        self.post_ct = keep((1 - abar_prev) * alphas.sqrt() / (1 - abar))
        # beta~_0 = 0: use beta~_1 in its place for the log (and as "large" variance at t=0)
        self.post_logvar = keep(torch.log(torch.cat([post_var[1:2], post_var[1:]])))
        self.large_logvar = keep(torch.log(torch.cat([post_var[1:2], b[1:]])))

    def q_sample(self, x0, t, noise):
        """eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        a = common.extract(self.abar, t, x0.shape)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def q_posterior(self, x0, xt, t):
        """eqs. 6-7: mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = common.extract(self.post_c0, t, xt.shape) * x0 + common.extract(self.post_ct, t, xt.shape) * xt
        return mean, common.extract(self.post_logvar, t, xt.shape)

    # Conversions between what the network may predict: eps, x_0, or v = sqrt(a) eps - sqrt(1-a) x_0
    def x0_from_eps(self, xt, t, eps):
        a = common.extract(self.abar, t, xt.shape)
        return (xt - (1 - a).sqrt() * eps) / a.sqrt()

    def eps_from_x0(self, xt, t, x0):
        a = common.extract(self.abar, t, xt.shape)
        return (xt - a.sqrt() * x0) / (1 - a).sqrt()

    def x0_from_v(self, xt, t, v):
        a = common.extract(self.abar, t, xt.shape)
        return a.sqrt() * xt - (1 - a).sqrt() * v

    def v_target(self, x0, t, eps):
        a = common.extract(self.abar, t, x0.shape)
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    def predict_x0(self, out, xt, t):
        if self.objective == "eps":
            return self.x0_from_eps(xt, t, out)
        return out if self.objective == "x0" else self.x0_from_v(xt, t, out)

    def loss(self, model, x0, **cond):
        """eq. 14, L_simple: t ~ U{0..T-1}, eps ~ N(0, I), MSE on the chosen target."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        target = {"eps": noise, "x0": x0, "v": self.v_target(x0, t, noise)}[self.objective]
        return F.mse_loss(model(xt, t, **cond).float(), target)

    def p_mean_variance(self, model, xt, t, clip=True, **cond):
        """p_theta(x_{t-1} | x_t) = N(mu~_t(x_t, x0_hat), sigma_t^2): x0_hat from the network, clipped
        to [-1, 1] (the official sampler), then the posterior mean of eq. 7 (equal to Algorithm 2's
        1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) when nothing is clipped)."""
        x0 = self.predict_x0(model(xt, self.timestep_map[t], **cond).float(), xt, t)
        if clip:
            x0 = x0.clamp(-1, 1)
        mean, logvar_small = self.q_posterior(x0, xt, t)
        logvar = common.extract(self.large_logvar, t, xt.shape) if self.var == "large" else logvar_small
        return mean, logvar, x0

    def p_sample(self, model, xt, t, clip=True, **cond):
        """Algorithm 2, line 4: x_{t-1} = mu + sigma_t z, no noise at t = 0."""
        mean, logvar, _ = self.p_mean_variance(model, xt, t, clip, **cond)
        nonzero = (t > 0).float().view(-1, *([1] * (xt.ndim - 1)))
        return mean + nonzero * (0.5 * logvar).exp() * torch.randn_like(xt)

    @torch.inference_mode()
    def sample(self, model, shape, device, clip=True, frames=0, **cond):
        """Algorithm 2: x_T ~ N(0, I), then T ancestral steps. Returns x_0 and `frames` snapshots."""
        x = torch.randn(shape, device=device)
        keep = set(torch.linspace(self.T - 1, 0, frames).round().long().tolist()) if frames else set()
        traj = []
        for i in common.steps_bar(reversed(range(self.T)), self.T, "sampling"):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            x = self.p_sample(model, x, t, clip, **cond)
            if i in keep:
                traj.append(x.cpu())
        return x, traj


def diffusion_from(cfg, device=None):
    """The config's diffusion; with a device, its schedule as float32 there (Diffusion)."""
    betas = common.beta_schedule(cfg["schedule"], cfg["timesteps"], cfg.get("beta_start", 1e-4),
                                 cfg.get("beta_end", 0.02))
    return Diffusion(betas, cfg["objective"], cfg["var"], device)


def respace(diff, steps):
    """Ancestral sampling on `steps` evenly spaced timesteps t_1 < ... < t_S of the T (Nichol & Dhariwal
    2021, sec. 4): keep abar at those t and set beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}, a shorter
    forward process with the same marginals q(x_t | x_0). Its timestep_map holds the t_i (S,) that the
    network, trained on the original timesteps, is called with. All T steps: the diffusion itself."""
    if not 1 <= steps <= diff.T:
        raise common.UserError(f"--steps {steps}: use 1..{diff.T}, the model's number of timesteps T")
    if steps == diff.T:
        return diff
    ts = torch.linspace(diff.T - 1, 0, steps, dtype=torch.float64).round().long().flip(0)
    abar = torch.cumprod(1 - diff.betas, 0)[ts]          # from the float64 betas, not the float32 copy
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return Diffusion(1 - abar / prev, diff.objective, diff.var, diff.device, timestep_map=ts)


#################################################################################
#                                    Training                                   #
#################################################################################

def objective(args):
    """common.train's objective: L_simple (eq. 14) and the grids' sampler (Algorithm 2, --steps respaced)."""
    def make(cfg, device):
        diff = diffusion_from(cfg, device)
        grids = respace(diff, args.steps or diff.T)              # a bad --steps fails before training
        shape = (cfg["channels"], cfg["image_size"], cfg["image_size"])

        def sample_fn(ema, n):
            return grids.sample(ema, (n, *shape), device, clip=not args.no_clip)[0]
        return (lambda net, x, y, caps: diff.loss(net, x)), sample_fn
    return make


#################################################################################
#                                    Sampling                                   #
#################################################################################

def load(path, device):
    """EMA network and diffusion from a ddpm.py checkpoint."""
    ck = common.load_checkpoint(path, ["ddpm"])
    model = common.build_unet(ck["config"])
    common.load_state(model, ck["ema"], path)
    return model.to(device).eval(), diffusion_from(ck["config"], device), ck


def load_weights(args, device):
    """--weights: the paper's released models as diffusers ported them from the TensorFlow checkpoints
    (google/ddpm-cifar10-32, the 256 px CelebA-HQ and LSUN ones): a folder or its weights file -> network,
    diffusion and a checkpoint-like dict. --objective, --var and --schedule override its config."""
    cfg, model, what = common.load_released_ddpm(args, "ddpm")
    cfg.update({k: getattr(args, k) for k in ("objective", "var", "schedule") if getattr(args, k)})
    ck = {"config": cfg, "step": None, "weights": what}
    return model.to(device).eval(), diffusion_from(cfg, device), ck


def load_model(args, device):
    """The network, diffusion and checkpoint(-like dict) of --sample and --eval: --weights, else --ckpt."""
    if args.weights:
        return load_weights(args, device)
    return load(args.ckpt or os.path.join(args.out, "ckpt.pt"), device)


def sample_images(args, device):
    """--sample: a grid of --n-samples (64) and a GIF of the reverse process, in --steps (all T) steps."""
    model, diff, ck = load_model(args, device)
    c = ck["config"]
    d = respace(diff, args.steps or diff.T)
    shape = (args.n_samples or 64, c["channels"], c["image_size"], c["image_size"])
    frames = 0 if args.no_gif else GIF_FRAMES
    torch.manual_seed(args.seed)
    with common.autocast(device, args.dtype):
        x, traj = d.sample(model, shape, device, clip=not args.no_clip, frames=frames)
    paths = [os.path.join(args.out, "samples.png")]
    common.save_grid(x, paths[0])
    if not args.no_gif:
        paths.append(os.path.join(args.out, "reverse.gif"))
        common.save_gif(traj, paths[1])
    released = f", released weights {ck['weights']}" if ck.get("weights") else ""
    print(f"{d.T} steps{released}: wrote {' and '.join(paths)}")


#################################################################################
#                                   Evaluation                                  #
#################################################################################

def evaluate(args, device):
    """--eval: FID/KID on common.py's judge; --steps S < T samples on S respaced timesteps."""
    model, diff, ck = load_model(args, device)
    c = ck["config"]
    steps = args.steps or diff.T
    d = respace(diff, steps)

    def sample_fn(n, wanted):
        with common.autocast(device, args.dtype):
            return d.sample(model, (n, c["channels"], c["image_size"], c["image_size"]), device,
                            clip=not args.no_clip)[0]

    info = {"steps": steps, **({"weights": ck["weights"]} if ck.get("weights") else {})}
    return common.evaluate("ddpm", args, c, sample_fn, nfe=steps, device=device, info=info)


#################################################################################
#                                  Command line                                 #
#################################################################################

def main(argv=None):
    p = common.make_parser("ddpm", __doc__, PRESETS, gifs=True, weights=(
        "the paper's CIFAR-10, CelebA-HQ and LSUN models as diffusers folders (google/ddpm-cifar10-32, "
        "google/ddpm-church-256, ...)"))
    p.add_argument("--objective", choices=["eps", "x0", "v"],
                   help="what the network predicts (default eps, eq. 14)")
    p.add_argument("--var", choices=["large", "small"],
                   help="sigma_t^2 = beta_t (large, default) or beta~_t (small)")
    p.add_argument("--schedule", choices=["linear", "cosine", "sigmoid"],
                   help="beta schedule (default linear)")
    p.add_argument("--no-clip", action="store_true", help="do not clip x0_hat to [-1, 1] when sampling")
    args = p.parse_args(argv)
    common.check_weights_flags(args)
    cfg = None if args.weights else common.make_config(args, PRESETS, keys=("objective", "var", "schedule"))
    return common.run(args, lambda: common.train("ddpm", args, cfg, common.build_unet, objective(args)),
                      sample_images, evaluate)


if __name__ == "__main__":
    common.main_guard(main)
