"""
Tackling the Generative Learning Trilemma with Denoising Diffusion GANs (Xiao, Kreis & Vahdat, ICLR 2022),
https://arxiv.org/abs/2112.07804 -- a diffusion model whose few, large denoising steps are conditional GANs.

    python ddgan.py --train                              # shapes, T = 4 (minutes on a laptop CPU)
    python ddgan.py --train --timesteps 1 --out out/gan  # the same networks as a one-step GAN
    python ddgan.py --sample --ckpt out/ddgan/ckpt.pt    # PNG grid + GIF of the T denoising steps
    python ddgan.py --eval                               # FID/KID, nfe = T, sec/image, recall, coverage

Schedule      the VP SDE discretised at t_i = i/T (1 - 1e-3) + 1e-3, i = 0..T: abar(t) = exp(-t^2 (b_max -
              b_min)/2 - t b_min), b_min 0.1, b_max 20; beta_i = 1 - abar(t_i)/abar(t_{i-1}), with 1e-8 in
              front (Sec. 4 / appendix; official code)
Forward       q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)                     (Sec. 2, eq. 1)
Generator     p_theta(x_{t-1} | x_t) = int p_theta(x_0 | x_t) q(x_{t-1} | x_t, x_0) dx_0, with the implicit
              x_0' = G_theta(x_t, z, t), z ~ N(0, I_100): sample x_0', then x_{t-1} ~ q(x_{t-1} | x_t, x_0')
              (the DDPM posterior), no noise at the last step                 (Sec. 3.3, "Parametrizing the
                                                                               implicit denoising model")
Discriminator D_phi(x_{t-1}, x_t, t): is x_{t-1} a plausible denoising of x_t?  (Sec. 3.2, "Modeling
              denoising distributions with conditional GANs")
Losses        non-saturating: L_D = softplus(-D(real pair)) + softplus(D(fake pair)),
              L_G = softplus(-D(fake pair)); real pairs (x_{t-1}, x_t) ~ q(x_{t-1}, x_t | x_0),
              fake pairs x_{t-1} ~ p_theta(. | x_t) for the same x_t                        (Sec. 3.2)
R1            gamma/2 E ||grad_{x_{t-1}} D(x_{t-1}, x_t, t)||^2 on real pairs, lazily every k steps and, as in
              the official code, NOT multiplied by k (StyleGAN2's lazy R1 is)       (Sec. 3.2 / appendix);
              official settings: gamma 0.02, k = 15 on CIFAR-10; gamma 1, k = 10 on LSUN Church; gamma 2,
              k = 10 on CelebA-HQ (the cpu preset)
Optimisation  Adam (0.5, 0.9), lr_G 1.6e-4, lr_D 1.25e-4, EMA 0.9999 of G; one D step then one G step, each
              with freshly drawn t, noise and z (appendix, official README/code)
Diversity     not the paper's: on in the cpu preset (L = 3), off in the paper preset and with --ds-lambda 0.
              G also maximises L E min(|x_0'(z_1) - x_0'(z_2)|_1 / |z_1 - z_2|_1, tau) over pairs that share
              x_t and t (DSGAN, Yang et al. 2019): without it, G here learns to ignore z (docs/ddgan.md)

Indexing: 0-based as in the official code. A pair index t in 0..T-1 is the paper's step t+1: the pair is
(x_t, x_{t+1}), G(x_{t+1}, z, t) predicts x_0, and the posterior draws x_t. With T = 1 this is a one-step GAN
(x_1 is almost pure noise, abar(1) ~ 4e-5) trained and sampled by the same code.

Networks: G is common.UNet with BigGAN up/down residual blocks and 1/sqrt(2) skips, laid out as the official
NCSN++ generator: the latent z goes through a mapping network (PixelNorm, then an MLP) and sets the scale and
shift of both GroupNorms of every residual block (common.StyleNorm), while t enters each block as an added
bias; tanh output. D is defined here: residual down-sampling conv blocks with LeakyReLU(0.2),
a time embedding, a [1,3,3,1] blur in plain torch before each stride-2 downsample, skips scaled by 1/sqrt(2),
a minibatch-stddev layer and a sum-pooled linear head (the official D_small's layout).
Not here: the NCSN++ generator itself (FIR resampling, progressive input; common.UNet resamples by average
pooling / nearest upsampling), the paper's cosine lr decay per epoch (a per-step cosine is the `cosine` key).
"""
import copy
import math
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

G_NET = dict(resblock_updown=True, skip_rescale=True)   # + z through StyleNorm, t as a bias (Generator)
PRESETS = {
    # seconds, for tests
    "tiny": dict(image_size=16, channels=3, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_res=[8], heads=2,
                 dropout=0.0, **G_NET, nz=100, z_dim=32, n_mlp=2, d_ch=16, d_mult=[1, 2], timesteps=4,
                 beta_min=0.1, beta_max=20.0, r1_gamma=0.02, lazy_reg=3, batch_size=8, max_steps=20,
                 lr=1e-3, lr_d=1e-3, cosine=False, ema=0.99, ds_lambda=3.0, ds_tau=0.1, log_every=5,
                 sample_every=0, ckpt_every=10, judge_steps=30),
    # the default: 23.8 minutes on the 2-core CPU, FID 6.18 (README). G and D at 16 base channels
    # (FID 23.3 against 65.2 for 32 channels and half the steps), D learning 10x faster than G (FID 12.6-14.3
    # against 23.3 with lr 2e-4 / lr_d 1.6e-4: D otherwise falls to chance within 100 steps), a strong R1 as
    # in the official LSUN Church (gamma 1) and CelebA-HQ (gamma 2) settings, every 10 steps (FID 8.7 and 8.4
    # over three seeds at 3200 steps, against 12.7 with CIFAR-10's gamma 0.02 every 15), and 3600 steps
    # (gamma 2: 7.6 over seeds 0-5, run uninterrupted; 4000 steps, which still fit, did worse: 8.4 over the
    # same seeds; 10800 steps, past the 30 minutes, gave 3.1-3.5 from seeds 0 and 3), and DSGAN's diversity
    # term at lambda 3 (not the paper's; G otherwise ignores z): 6.9 against 7.6 over seeds 0-5, but 6.4
    # against 4.4 at 7200 steps from seed 3, so long runs go better with --ds-lambda 0: docs/ddgan.md
    "cpu": dict(image_size=32, channels=3, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_res=[8], heads=4,
                dropout=0.0, **G_NET, nz=100, z_dim=64, n_mlp=3, d_ch=16, d_mult=[1, 2, 4, 4], timesteps=4,
                beta_min=0.1, beta_max=20.0, r1_gamma=2.0, lazy_reg=10, batch_size=32, max_steps=3600,
                lr=1e-4, lr_d=1e-3, cosine=False, ema=0.999, ds_lambda=3.0, ds_tau=0.1, log_every=25,
                sample_every=0, ckpt_every=500),
    # CIFAR-10 (official README): NCSN++-size G (ch 128, mult 1,2,2,2, 2 blocks, attention at 16), nz 100,
    # 4-layer mapping 256 wide (z_emb_dim), D_small 128-128-256-512-512, lr_G 1.6e-4, lr_D 1.25e-4 (cosine
    # decay to 1e-5), r1 gamma 0.02 every 15 steps, batch 64 per GPU (x 4 GPUs), EMA 0.9999, T = 4,
    # 1800 epochs ~ 211K steps
    "paper": dict(image_size=32, channels=3, ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_res=[16],
                  heads=1, dropout=0.0, **G_NET, nz=100, z_dim=256, n_mlp=4, d_ch=128, d_mult=[1, 2, 4, 4],
                  timesteps=4, beta_min=0.1, beta_max=20.0, r1_gamma=0.02, lazy_reg=15, batch_size=64,
                  max_steps=211_000, lr=1.6e-4, lr_d=1.25e-4, cosine=True, ema=0.9999, flip=True,
                  log_every=100, sample_every=10_000, ckpt_every=5000),
}
ETA_MIN = 1e-5   # the cosine decay's floor (official code)


#################################################################################
#        The paper's maths: the discretised VP schedule and its posterior       #
#################################################################################

class Schedule:
    """The T-step discretisation of the VP SDE that DDGAN uses (official code), computed in float64 and kept
    as float32 on `device` (common.on_device; None keeps float64 for the tests of the math). Index 0 of
    `betas` is the 1e-8 step in front of the T real ones."""

    def __init__(self, T=4, beta_min=0.1, beta_max=20.0, eps=1e-3, device=None):
        if T < 1:
            raise common.UserError(f"--timesteps {T}: use 1 or more (the paper: 4 on CIFAR-10, 2 on "
                                   "CelebA-HQ)")
        keep = common.on_device(device)
        self.T = T
        i = torch.arange(T + 1, dtype=torch.float64)
        self.tc = i / T * (1 - eps) + eps                                          # t_i in [1e-3, 1]
        # abar(t_i), the marginal of the VP SDE
        abar_c = torch.exp(-0.5 * self.tc ** 2 * (beta_max - beta_min) - self.tc * beta_min)
        self.betas = torch.cat([torch.full((1,), 1e-8, dtype=torch.float64), 1 - abar_c[1:] / abar_c[:-1]])
        a = (1 - self.betas).sqrt()                      # one step: x_{t+1} = a x_t + sigma eps   (eq. 1)
        a_cum = torch.cumprod(a, 0)                      # q(x_t | x_0) = N(a_cum x_0, sigma_cum^2 I)
        self.a, self.sigma = keep(a), keep(self.betas.sqrt())
        self.a_cum, self.sigma_cum = keep(a_cum), keep((1 - a_cum ** 2).sqrt())
        # q(x_t | x_{t+1}, x_0) over the T real steps (betas[1:]), DDPM eqs. 6-7 (Sec. 3.3)
        b = self.betas[1:]
        abar = torch.cumprod(1 - b, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = b * (1 - abar_prev) / (1 - abar)                                # beta~ (0 at t = 0)
        self.post_var, self.post_logvar = keep(post_var), keep(post_var.clamp(min=1e-20).log())
        self.post_c0 = keep(b * abar_prev.sqrt() / (1 - abar))
        self.post_ct = keep((1 - abar_prev) * (1 - b).sqrt() / (1 - abar))

    def q_sample(self, x0, t, noise=None):
        """x_t ~ q(x_t | x_0) = N(a_cum_t x_0, sigma_cum_t^2 I) for pair indices t (B,) in 0..T-1."""
        noise = torch.randn_like(x0) if noise is None else noise
        mean_scale = common.extract(self.a_cum, t, x0.shape)
        return mean_scale * x0 + common.extract(self.sigma_cum, t, x0.shape) * noise

    def q_sample_pairs(self, x0, t):
        """A real pair (x_t, x_{t+1}) ~ q(x_t | x_0) q(x_{t+1} | x_t) (eq. 1): what D must call real
        (Sec. 3.2)."""
        xt = self.q_sample(x0, t)
        a, sigma = common.extract(self.a, t + 1, x0.shape), common.extract(self.sigma, t + 1, x0.shape)
        xt1 = a * xt + sigma * torch.randn_like(x0)
        return xt, xt1

    def posterior(self, x0, xt1, t):
        """Mean and log-variance of q(x_t | x_{t+1}, x_0) (Sec. 3.3; DDPM eq. 7)."""
        c0, ct = common.extract(self.post_c0, t, x0.shape), common.extract(self.post_ct, t, x0.shape)
        mean = c0 * x0 + ct * xt1
        return mean, common.extract(self.post_logvar, t, x0.shape)

    def sample_posterior(self, x0, xt1, t):
        """x_t ~ q(x_t | x_{t+1}, x_0'), with no noise at t = 0 (Sec. 3.3): one step of p_theta."""
        mean, logvar = self.posterior(x0, xt1, t)
        nonzero = (t > 0).float().view(-1, *([1] * (x0.ndim - 1)))
        return mean + nonzero * (0.5 * logvar).exp() * torch.randn_like(x0)


def schedule_from(cfg, device=None):
    return Schedule(cfg["timesteps"], cfg.get("beta_min", 0.1), cfg.get("beta_max", 20.0), device=device)


#################################################################################
#          The paper's maths: the adversarial losses, one training step         #
#################################################################################

def discriminator_loss(d_real, d_fake):
    """Non-saturating GAN, D side: E softplus(-D(real)) + E softplus(D(fake)) (Sec. 3.2)."""
    return F.softplus(-d_real.float()).mean() + F.softplus(d_fake.float()).mean()


def generator_loss(d_fake):
    """Non-saturating GAN, G side: E softplus(-D(fake)) (Sec. 3.2)."""
    return F.softplus(-d_fake.float()).mean()


def r1_penalty(d_real, x_real, gamma):
    """R1: gamma/2 E_batch ||grad_{x_real} D||^2 on real inputs (Mescheder et al. 2018; DDGAN Sec. 3.2 /
    appendix). x_real must require grad; create_graph so the penalty trains D."""
    g, = torch.autograd.grad(d_real.float().sum(), x_real, create_graph=True)
    return gamma / 2 * g.float().square().flatten(1).sum(1).mean()


def diversity(x0_pred, z, tau):
    """Not DDGAN's: the diversity-sensitive term of DSGAN (Yang et al., ICLR 2019),
    E min(|x_0'(z_1) - x_0'(z_2)|_1 / |z_1 - z_2|_1, tau), over the pairs (i, i + B/2) of a G step whose
    halves share x_{t+1} and t. G maximises it: without it G here ignores z (docs/ddgan.md), and each step
    falls back to the Gaussian posterior around one x_0' that Sec. 3.1 argues cannot take large steps.
    tau (default 0.1) is about the ratio that two random images of the shapes data give."""
    h = z.shape[0] // 2
    ratio = (x0_pred[:h] - x0_pred[h:]).abs().mean((1, 2, 3)) / (z[:h] - z[h:]).abs().mean(1)
    return ratio.clamp(max=tau).mean()


def average_gradients(module, world):
    """DDP by hand (one all-reduce of the flattened gradients): robust with R1's double backward."""
    if world <= 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def train_step(G, D, opt_g, opt_d, sched, x0, cfg, step, amp=None, world=1):
    """One D step then one G step, each with freshly drawn t, noise and z (official code's order).
    Returns (loss_D, loss_G, r1) as detached tensors; r1 is 0 on steps without the lazy penalty."""
    amp = amp or nullcontext()
    B, dev = x0.shape[0], x0.device
    # D: real pair (x_t, x_{t+1}) ~ q vs fake pair (x'_t ~ p_theta(. | x_{t+1}), x_{t+1})
    D.requires_grad_(True)
    t = torch.randint(0, sched.T, (B,), device=dev)
    x_t, x_t1 = sched.q_sample_pairs(x0, t)
    reg = cfg["r1_gamma"] > 0 and step % cfg["lazy_reg"] == 0
    x_t.requires_grad_(reg)
    with amp:
        d_real = D(x_t, x_t1, t)
    with torch.no_grad(), amp:
        x0_fake = G(x_t1, t, torch.randn(B, cfg["nz"], device=dev)).float()
    x_fake = sched.sample_posterior(x0_fake, x_t1, t)
    with amp:
        d_fake = D(x_fake, x_t1, t)
    loss_d = discriminator_loss(d_real, d_fake)
    r1 = r1_penalty(d_real, x_t, cfg["r1_gamma"]) if reg else torch.zeros((), device=dev)
    opt_d.zero_grad(set_to_none=True)
    (loss_d + r1).backward()
    average_gradients(D, world)
    opt_d.step()
    # G: make D call x'_t ~ p_theta(x_t | x_{t+1}) real; D frozen
    D.requires_grad_(False)
    lam = cfg.get("ds_lambda", 0.0)
    n = B // 2 if lam else B
    t = torch.randint(0, sched.T, (n,), device=dev)
    _, x_t1 = sched.q_sample_pairs(x0[:n], t)
    if lam:   # the diversity term's pairs: i and i + B/2 share t and x_{t+1}, and differ in z
        t, x_t1 = t.repeat(2), x_t1.repeat(2, 1, 1, 1)
    z = torch.randn(t.shape[0], cfg["nz"], device=dev)
    with amp:
        x0_pred = G(x_t1, t, z)
    x_fake = sched.sample_posterior(x0_pred.float(), x_t1, t)
    with amp:
        loss_g = generator_loss(D(x_fake, x_t1, t))
    loss = loss_g - lam * diversity(x0_pred.float(), z, cfg.get("ds_tau", 0.1)) if lam else loss_g
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(G, world)
    opt_g.step()
    D.requires_grad_(True)
    return loss_d.detach(), loss_g.detach(), r1.detach()


#################################################################################
#               The paper's maths: sampling in T steps (Sec. 3.3)               #
#################################################################################

@torch.inference_mode()
def sample(G, sched, n, shape, device, amp=None):
    """x_T ~ N(0, I); for t = T-1..0: x_0' = G(x_{t+1}, z, t), x_t ~ q(x_t | x_{t+1}, x_0'). Returns x_0
    (n, C, H, W) and the trajectory [x_T, ..., x_0] (T + 1 frames, on the CPU)."""
    amp = amp or nullcontext()
    x = torch.randn(n, *shape, device=device)
    traj = [x.cpu()]
    for i in reversed(range(sched.T)):
        t = torch.full((n,), i, device=device, dtype=torch.long)
        with amp:
            x0 = G(x, t, torch.randn(n, G.nz, device=device)).float()
        x = sched.sample_posterior(x0, x, t)
        traj.append(x.cpu())
    return x.clamp(-1, 1), traj


#################################################################################
#           The paper's networks: the generator and the discriminator           #
#################################################################################

class PixelNorm(nn.Module):
    """z / sqrt(mean(z^2)) per sample (StyleGAN's mapping network input)."""

    def forward(self, z):
        return z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)


class Generator(nn.Module):
    """G(x_{t+1}, z, t) -> x_0' in [-1, 1] (Sec. 3.3): common.UNet whose residual blocks take t as an added
    bias and the latent z, through a mapping network w = MLP(PixelNorm(z)), as the scale and shift of both of
    their GroupNorms (AdaGN of w), as the official NCSN++ generator does."""

    def __init__(self, cfg):
        super().__init__()
        self.nz, d = cfg["nz"], cfg.get("z_dim", 4 * cfg["ch"])   # the default: checkpoints from before z_dim
        self.unet = common.build_unet({**cfg, "scale_shift": False, "style_dim": d})
        layers = [PixelNorm(), nn.Linear(self.nz, d), nn.SiLU()]
        for _ in range(cfg.get("n_mlp", 4)):
            layers += [nn.Linear(d, d), nn.SiLU()]
        self.mapping = nn.Sequential(*layers)

    def forward(self, x, t, z):
        return torch.tanh(self.unet(x, t, style=self.mapping(z)))


def blur_down(x):
    """[1,3,3,1] FIR low-pass then stride 2, in plain torch (the official code compiles a CUDA op for it)."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :]) / 64
    C = x.shape[1]
    return F.conv2d(F.pad(x, (1, 1, 1, 1)), k.expand(C, 1, 4, 4), stride=2, groups=C)


class DownBlock(nn.Module):
    """LeakyReLU -> conv -> + dense(t_emb) -> LeakyReLU -> (blur, stride 2) -> conv (zero init), plus a 1x1
    skip (blurred and strided too), summed and scaled by 1/sqrt(2)."""

    def __init__(self, cin, cout, tdim, down):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = common.zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.dense = nn.Linear(tdim, cout)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)
        self.down = down

    def forward(self, x, temb):
        h = self.conv1(F.leaky_relu(x, 0.2)) + self.dense(temb)[:, :, None, None]
        h = F.leaky_relu(h, 0.2)
        if self.down:
            h, x = blur_down(h), blur_down(x)
        return (self.conv2(h) + self.skip(x)) * 2 ** -0.5


class Discriminator(nn.Module):
    """D(x_{t-1}, x_t, t) -> logit (B,): the pair concatenated on channels (Sec. 3.2), a 1x1 conv, one block
    per entry of d_mult (every block after the first halves the resolution), minibatch stddev (groups of 4),
    conv, LeakyReLU, sum over pixels, linear. t: sinusoidal embedding -> 2-layer MLP."""

    def __init__(self, cfg, mbstd=True):
        super().__init__()
        ch, C = cfg["d_ch"], cfg["channels"]
        tdim = 2 * ch
        self.tdim, self.mbstd = tdim, mbstd
        self.t_mlp = nn.Sequential(nn.Linear(tdim, tdim), nn.LeakyReLU(0.2), nn.Linear(tdim, tdim),
                                   nn.LeakyReLU(0.2))
        self.conv_in = nn.Conv2d(2 * C, ch, 1)
        self.blocks, c = nn.ModuleList(), ch
        for i, m in enumerate(cfg["d_mult"]):
            self.blocks.append(DownBlock(c, ch * m, tdim, down=i > 0))
            c = ch * m
        self.conv_out = nn.Conv2d(c + (1 if mbstd else 0), c, 3, padding=1)
        self.head = nn.Linear(c, 1)

    def minibatch_std(self, h, group=4):
        """Append the across-group std of the features, averaged, as one more channel (StyleGAN)."""
        B, C, H, W = h.shape
        g = math.gcd(B, group)
        s = h.view(g, -1, C, H, W)
        s = (s.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))        # (B / g,)
        return torch.cat([h, s.view(-1, 1, 1, 1).repeat(g, 1, H, W)], 1)

    def forward(self, x_prev, x_t, t):
        temb = self.t_mlp(common.timestep_embedding(t, self.tdim).to(x_prev.dtype))
        h = self.conv_in(torch.cat([x_prev, x_t], 1))
        for b in self.blocks:
            h = b(h, temb)
        if self.mbstd:
            h = self.minibatch_std(h)
        h = F.leaky_relu(self.conv_out(h), 0.2).sum((2, 3))
        return self.head(h).squeeze(1)


#################################################################################
#                                    Training                                   #
#################################################################################

def lr_at(step, lr, cfg):
    """Constant, or cosine from lr to ETA_MIN over max_steps (the official code anneals per epoch)."""
    if not cfg.get("cosine"):
        return lr
    lo = min(ETA_MIN, lr)
    return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * min(step, cfg["max_steps"]) / cfg["max_steps"]))


def train(args, cfg):
    """--train: G and D on --data through common.train_loop, the loop of every script here (exact --resume,
    atomic checkpoints, Ctrl-C, a stop when the losses diverge); a step is train_step, then the EMA of G."""
    if args.steps is not None and args.steps != cfg["timesteps"]:
        raise common.UserError(f"--steps {args.steps}: DDGAN samples in exactly its T = {cfg['timesteps']} "
                               "steps; set T with --timesteps")
    if cfg.get("ds_lambda") and cfg["batch_size"] < 2:
        raise common.UserError(f"--ds-lambda {cfg['ds_lambda']:g} (DSGAN's term) needs pairs: --batch-size "
                               f"{cfg['batch_size']} is below 2 (use 2 or more, or --ds-lambda 0)")
    run = common.start_training("ddgan", args, cfg)
    cfg, device = run.cfg, run.device
    sched = schedule_from(cfg, device)
    torch.manual_seed(args.seed)
    G, D = Generator(cfg).to(device), Discriminator(cfg).to(device)
    ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_g = common.make_optimizer(G.parameters(), cfg["lr"], betas=(0.5, 0.9), device=device)
    opt_d = common.make_optimizer(D.parameters(), cfg["lr_d"], betas=(0.5, 0.9), device=device)
    state = {"G": G, "D": D, "ema": ema, "opt_g": opt_g, "opt_d": opt_d}
    step = common.restore(state, run.ck, run.path)
    if common.already_done("ddgan", step, cfg["max_steps"]):
        return None, cfg
    amp = common.autocast(device, args.dtype)
    shape = (cfg["channels"], cfg["image_size"], cfg["image_size"])
    G_step = torch.compile(G) if args.compile else G   # not D: R1's double backward does not compile

    def step_fn(step, batch):
        common.set_lr(opt_g, lr_at(step, cfg["lr"], cfg))
        common.set_lr(opt_d, lr_at(step, cfg["lr_d"], cfg))
        x0 = batch[0].to(device, non_blocking=True)
        loss_d, loss_g, r1 = train_step(G_step, D, opt_g, opt_d, sched, x0, cfg, step, amp, run.world)
        common.ema_update(ema, G, common.ema_decay(step, cfg["ema"]))
        return {"d": loss_d, "g": loss_g, "r1": r1}

    def save(step):
        common.save_state(run.path, state, step, script="ddgan", config=cfg, seed=args.seed)

    def grid(n):
        return sample(ema, sched, n, shape, device, amp)[0]

    if run.rank == 0:
        print(f"ddgan: G {common.count_params(G) / 1e6:.2f}M + D {common.count_params(D) / 1e6:.2f}M "
              f"parameters, T = {sched.T}, {common.describe(run, step)}", flush=True)
    G.train()
    D.train()
    data = common.batches(run.data, cfg["batch_size"], args.seed, step, run.rank, run.world,
                          flip=cfg.get("flip", False) and not run.data.endless)
    common.train_loop("ddgan", step_fn, save, step, cfg["max_steps"], run.path, cfg, data, args.seed,
                      rank=run.rank, world=run.world, grid=grid,
                      advice="try a lower --lr/--lr-d or a larger --r1-gamma")
    if run.rank == 0:
        torch.manual_seed(args.seed)
        path = os.path.join(args.out, "samples.png")
        common.save_grid(sample(ema, sched, args.n_samples or 36, shape, device)[0], path)
        print(f"samples: {path}")
    return ema, cfg


#################################################################################
#                                    Sampling                                   #
#################################################################################

def load(path, device):
    """EMA generator and schedule from a ddgan.py checkpoint."""
    ck = common.load_checkpoint(path, ["ddgan"])
    G = common.load_state(Generator(ck["config"]), ck["ema"], path)
    return G.to(device).eval(), schedule_from(ck["config"], device), ck


def load_model(args, device):
    """--sample's and --eval's generator (the EMA of --ckpt, default <out>/ckpt.pt), its schedule and
    checkpoint; DDGAN samples in exactly the T steps it was trained for."""
    G, sched, ck = load(args.ckpt or os.path.join(args.out, "ckpt.pt"), device)
    if args.timesteps is not None and args.timesteps != sched.T:
        raise common.UserError(f"--timesteps {args.timesteps}: this checkpoint was trained with T = "
                               f"{sched.T}; DDGAN samples in exactly the T steps it was trained for")
    if args.steps is not None and args.steps != sched.T:
        raise common.UserError(f"--steps {args.steps}: DDGAN samples in exactly T = {sched.T} steps (its "
                               "training T)")
    return G, sched, ck


def sample_images(args, device):
    """--sample: a grid and a GIF of the T denoising steps."""
    G, sched, ck = load_model(args, device)
    c = ck["config"]
    torch.manual_seed(args.seed)
    amp = common.autocast(device, args.dtype)
    shape = (c["channels"], c["image_size"], c["image_size"])
    x, traj = sample(G, sched, args.n_samples or 64, shape, device, amp)
    paths = [os.path.join(args.out, "samples.png")]
    common.save_grid(x, paths[0])
    if not args.no_gif:
        paths.append(os.path.join(args.out, "reverse.gif"))
        common.save_gif(traj, paths[1], duration=400)
    print(f"wrote {' and '.join(paths)} ({sched.T} network evaluations per image)")


#################################################################################
#                   Evaluation: FID at T steps, mode coverage                   #
#################################################################################

def evaluate(args, device):
    """--eval: FID/KID (common.evaluate) at nfe = T, with precision, recall and the shape x color coverage of
    the same samples (mode coverage: the paper reports recall, Table 1)."""
    G, sched, ck = load_model(args, device)
    c = ck["config"]
    shape = (c["channels"], c["image_size"], c["image_size"])
    amp = common.autocast(device, args.dtype)
    return common.evaluate("ddgan", args, c, lambda n, wanted: sample(G, sched, n, shape, device, amp)[0],
                           nfe=sched.T, device=device, info={"timesteps": sched.T}, diversity=True)


#################################################################################
#                                  Command line                                 #
#################################################################################

def main(argv=None):
    p = common.make_parser("ddgan", __doc__, PRESETS, gifs=True)
    p.add_argument("--timesteps", type=common.positive_int,
                   help="denoising steps T (default 4; 1 = a one-step GAN); --train only")
    p.add_argument("--nz", type=common.positive_int, help="latent z size (default 100)")
    p.add_argument("--r1-gamma", type=common.nonneg_float,
                   help="R1 weight gamma on real pairs (default: cpu 2, paper 0.02; 0 = off)")
    p.add_argument("--lazy-reg", type=common.positive_int,
                   help="apply R1 every k steps (default: cpu 10, paper 15)")
    p.add_argument("--lr-d", type=common.positive_float,
                   help="discriminator learning rate (--lr is the generator's)")
    p.add_argument("--ds-lambda", type=common.nonneg_float,
                   help="weight of DSGAN's diversity term in G's loss (not the paper's; default: cpu 3, "
                   "paper 0 = off)")
    args = p.parse_args(argv)
    cfg = common.make_config(args, PRESETS, keys=("timesteps", "nz", "r1_gamma", "lazy_reg", "lr_d",
                                                  "ds_lambda"))
    return common.run(args, lambda: train(args, cfg), sample_images, evaluate)


if __name__ == "__main__":
    common.main_guard(main)
