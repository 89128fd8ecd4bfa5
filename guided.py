"""
Diffusion Models Beat GANs on Image Synthesis (Dhariwal & Nichol, 2021), https://arxiv.org/abs/2105.05233
("ADM"), with the learned variances of Improved DDPM (Nichol & Dhariwal, 2021),
https://arxiv.org/abs/2102.09672

    python guided.py --train                        # the diffusion model, then the noisy classifier (shapes)
    python guided.py --sample --class 2 --scale 2   # triangles, classifier guidance (Algorithm 1)
    python guided.py --sample --class 0 --scale 2 --sampler ddim --steps 25   # guided DDIM (Algorithm 2)
    python guided.py --eval --scale 1               # FID/KID and the accuracy of the asked class (JSON last)
    python guided.py --eval --sweep                 # guidance scales x (FID, accuracy, precision, recall)
                                                    # and respaced steps; --baseline: a fixed-variance model
    python guided.py --sample --weights 64x64_diffusion.pt --classifier-weights 64x64_classifier.pt \\
        --class 207                                 # ADM's released ImageNet 64 model (README)

Timesteps are 0-indexed as in ddpm.py: abar_t = prod_{s<=t} (1 - beta_s), t = 0 is one noising step.
"IDDPM" is Nichol & Dhariwal 2021, "DDPM" Ho et al. 2020, "ADM" Dhariwal & Nichol 2021.

Cosine schedule   abar_t = f(t) / f(0), f(t) = cos^2((t/T + 0.008) / 1.008 pi/2), beta_t <= 0.999
                                                                                        (IDDPM eq. 17)
Forward process   q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)                     (DDPM eq. 4)
Posterior         q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I),
                  beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)                       (DDPM eqs. 6-7)
Mean              mu_theta = mu~_t(x_t, x0_hat), x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)
Learned variance  the network outputs [eps, v]; Sigma_theta = exp(frac log beta_t + (1 - frac) log beta~_t),
                  frac = (v + 1) / 2 (the official code's range for v; the paper writes v for frac)
                                                                                        (IDDPM eq. 15)
Bound             L_vlb = L_0 + ... + L_{T-1}, L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)),
                  L_0 = -log p_theta(x_0 | x_1), a discretized Gaussian on the 256 pixel levels
                                                                                        (DDPM eq. 13)
Hybrid loss       L_hybrid = L_simple + lambda L_vlb, lambda = 0.001, with mu_theta detached in L_vlb, so
                  L_vlb trains only Sigma_theta; one uniform t estimates L_vlb by T L_t  (IDDPM eq. 16)
Respacing         a subsequence S of the T steps: beta'_i = 1 - abar_{S_i} / abar_{S_{i-1}}, the same
                  marginals; the learned v interpolates between the respaced beta' and beta~'
                                                                                        (IDDPM Sec. 4)
Classifier        p_phi(y | x_t, t): the U-Net's downsampling half + attention pooling, cross-entropy on
                  x_t = q_sample(x_0, t), t ~ U{0..T-1}                                  (ADM Sec. 4)
Guided ancestral  x_{t-1} ~ N(mu + s Sigma grad_{x_t} log p_phi(y | x_t), Sigma)         (ADM Algorithm 1)
Guided DDIM       eps^ = eps_theta(x_t) - s sqrt(1 - abar_t) grad_{x_t} log p_phi(y | x_t),
                  x_{t-1} = sqrt(abar_{t-1}) x0_hat(eps^) + sqrt(1 - abar_{t-1}) eps^ (eta = 0)
                                                                                        (ADM Algorithm 2)
Architecture      common.UNet with ADM's options (ADM Sec. 3): more depth (residual blocks per resolution),
                  64 channels per attention head, attention at 32, 16 and 8, BigGAN up/down residual blocks,
                  AdaGN: GroupNorm(h) (1 + y_s) + y_b with (y_s, y_b) from the time (and class) embedding;
                  residuals scaled by 1/sqrt(2) as an option (ADM_NET below), off as in ADM's final model.
Not here          IDDPM's importance sampling of t for L_vlb alone (Sec. 3.3; the hybrid loss samples t
                  uniformly), fp16 training, the upsampler models, classifier-free guidance (see ldm.py).
"""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ADM Sec. 3: AdaGN and BigGAN up/down blocks. Residuals scaled by 1/sqrt(2) are one of the options ADM's
# Table 1 ablates; its final architecture and the released code (guided_diffusion/unet.py) do not use them,
# so they are off here: skip_rescale=True turns them on (common.UNet and the classifier read it).
ADM_NET = dict(scale_shift=True, resblock_updown=True, skip_rescale=False)
PRESETS = {
    # seconds, for tests
    "tiny": dict(image_size=16, channels=3, ch=16, ch_mult=[1, 2], num_res_blocks=2, attn_res=[16, 8],
                 head_channels=8, dropout=0.0, timesteps=100, schedule="cosine", var="learned",
                 class_cond=False, **ADM_NET, batch_size=8, max_steps=20, lr=1e-3, warmup=0, grad_clip=1.0,
                 ema=0.99, log_every=5, sample_every=0, ckpt_every=10, judge_steps=30,
                 clf_ch=16, clf_ch_mult=[1, 2], clf_depth=1, clf_attn_res=[8], clf_steps=10, clf_batch=8,
                 clf_lr=1e-3, clf_wd=0.05),
    # the default: minutes on a 2-core CPU (ddpm.py's depth and width, plus attention at 16x16, AdaGN,
    # BigGAN up/down); class-conditional and guided as ADM-G, the paper's best: an unconditional model
    # guided at s = 1 drew the asked MNIST digit in 0.55 of the samples (docs/real_data.md)
    "cpu": dict(image_size=32, channels=3, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_res=[16, 8],
                head_channels=32, dropout=0.0, timesteps=1000, schedule="cosine", var="learned",
                class_cond=True, **ADM_NET, batch_size=32, max_steps=2400, lr=1e-3, warmup=100,
                grad_clip=1.0, ema=0.995, log_every=25, sample_every=0, ckpt_every=500,
                clf_ch=32, clf_ch_mult=[1, 2, 2], clf_depth=1, clf_attn_res=[8], clf_steps=800, clf_batch=64,
                clf_lr=1e-3, clf_wd=0.05),
    # ADM ImageNet 64x64 (the guided-diffusion README's flags): ch 192, mult 1,2,3,4, 3 blocks, 64 channels
    # per head at 32/16/8, dropout 0.1, learned sigmas, cosine T = 1000, lr 3e-4, class-conditional, EMA
    # 0.9999; batch 2048 = 256 per process x 8 GPUs. Classifier: depth 4, width 128, AdamW lr 3e-4, weight
    # decay 0.05.
    "paper": dict(image_size=64, channels=3, ch=192, ch_mult=[1, 2, 3, 4], num_res_blocks=3,
                  attn_res=[32, 16, 8], head_channels=64, dropout=0.1, timesteps=1000, schedule="cosine",
                  var="learned", class_cond=True, **ADM_NET, batch_size=256, max_steps=540_000, lr=3e-4,
                  warmup=0, grad_clip=0.0, ema=0.9999, flip=True, log_every=100, sample_every=10_000,
                  ckpt_every=5000, clf_ch=128, clf_ch_mult=[1, 2, 3, 4], clf_depth=4,
                  clf_attn_res=[32, 16, 8], clf_steps=300_000, clf_batch=256, clf_lr=3e-4, clf_wd=0.05),
}
GIF_FRAMES = 20             # snapshots of the reverse process in reverse.gif
MAX_COLUMNS = 16            # --sample without --class: one class per column up to this many classes
DEFAULT_STEPS = 100         # respaced sampling steps (IDDPM Sec. 4: learned sigmas hold up at 100; ADM: 250)
DEFAULT_SCALE = 1.0         # ADM's guidance scale for ImageNet 64
LAMBDA_VLB = 0.001          # IDDPM eq. 16
SWEEP_SCALES = [0.0, 0.5, 1.0, 2.0, 5.0, 10.0]
SWEEP_STEPS = [25, 50, 100]
CLASSIFIER_SEED = 1         # --seed + this: the classifier's initialization and data order
CLASSIFIER_STREAM = 500_009  # common.step_seed's stream for the classifier, apart from the diffusion model's


#################################################################################
#                 The paper's maths: the bound's Gaussian terms                 #
#################################################################################

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per dimension, in nats:
    1/2 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1)."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """DDPM eq. 13, log p(x_0 | x_1) of images x in [-1, 1] on the 256 levels -1 + 2k/255: the mass the
    Gaussian N(mean, e^(2 log_scale)) puts on the bin [x - 1/255, x + 1/255], and on (-inf, -1 + 1/255] and
    [1 - 1/255, inf) at the two end levels. Exact normal CDFs (the official code uses a tanh approximation);
    every log mass is clamped at log(1e-12) as there. Per dimension, in nats."""
    inv_std = torch.exp(-log_scale)
    upper, lower = inv_std * (x - mean + 1 / 255), inv_std * (x - mean - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)                 # x = -1: P(X <= -1 + 1/255)
    log_sf_lower = torch.special.log_ndtr(-lower)                 # x = +1: P(X >= 1 - 1/255)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    logp = torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))
    return logp.clamp(min=math.log(1e-12))


def mean_flat(x):
    return x.flatten(1).mean(1)


#################################################################################
#          The paper's maths: learned variances, hybrid loss, respacing         #
#################################################################################

class Diffusion:
    """Everything derived from the betas, computed in float64 and kept as float32 on `device`
    (common.on_device; device None keeps float64 for the tests of the math). var: 'learned' (IDDPM eq. 15),
    'large' (sigma^2 = beta_t) or 'small' (beta~_t). timestep_map[i] is the original timestep of step i,
    which the network and the classifier are called with (the identity unless respaced)."""

    def __init__(self, betas, var="learned", timestep_map=None, device=None):
        b = torch.as_tensor(betas, dtype=torch.float64)   # stays float64 on the CPU: respace derives from it
        keep = common.on_device(device)
        self.T, self.var, self.betas, self.device = len(b), var, b, device
        abar = torch.cumprod(1 - b, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = b * (1 - abar_prev) / (1 - abar)                                           # beta~_t
        # beta~_0 = 0: its log is clipped to log beta~_1, as in the official code (with one step, log beta_0)
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if self.T > 1 else b.log()
        self.abar, self.abar_prev = keep(abar), keep(abar_prev)
        self.post_var, self.post_logvar = keep(post_var), keep(post_logvar)
        self.post_c0 = keep(b * abar_prev.sqrt() / (1 - abar))                     # mu~_t = c0 x_0 + ct x_t
        self.post_ct = keep((1 - abar_prev) * (1 - b).sqrt() / (1 - abar))
        self.log_betas = keep(b.log())
        self.large_logvar = keep(torch.cat([post_logvar[:1], b.log()[1:]]))        # DDPM's fixedlarge
        tmap = torch.arange(self.T) if timestep_map is None else torch.as_tensor(timestep_map)
        self.timestep_map = tmap if device is None else tmap.to(device)

    def q_sample(self, x0, t, noise):
        """DDPM eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        a = common.extract(self.abar, t, x0.shape)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def q_posterior(self, x0, xt, t):
        """DDPM eqs. 6-7: mean and (clipped) log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = common.extract(self.post_c0, t, xt.shape) * x0 + common.extract(self.post_ct, t, xt.shape) * xt
        return mean, common.extract(self.post_logvar, t, xt.shape)

    def x0_from_eps(self, xt, t, eps):
        a = common.extract(self.abar, t, xt.shape)
        return (xt - (1 - a).sqrt() * eps) / a.sqrt()

    def eps_from_x0(self, xt, t, x0):
        a = common.extract(self.abar, t, xt.shape)
        return (xt - a.sqrt() * x0) / (1 - a).sqrt()

    def learned_logvar(self, v, t):
        """IDDPM eq. 15: log Sigma = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2, so v = +1
        gives beta_t and v = -1 gives beta~_t (clipped at t = 0). v is not clamped."""
        frac = (v + 1) / 2
        log_beta, log_beta_tilde = (common.extract(a, t, v.shape) for a in (self.log_betas, self.post_logvar))
        return frac * log_beta + (1 - frac) * log_beta_tilde

    def model_output(self, model, xt, t, y=None):
        """The network at the original timestep of step t (respacing), in float32."""
        return model(xt, self.timestep_map[t], y).float()

    def p_mean_variance(self, model, xt, t, y=None, clip=True, out=None):
        """p_theta(x_{t-1} | x_t) = N(mu~_t(x_t, x0_hat), Sigma): x0_hat from eps (clipped to [-1, 1] when
        sampling), Sigma learned (IDDPM eq. 15) or fixed. `out` is the network's output where the caller has
        it already (the hybrid loss). A 2C-channel output is [eps, v]; a fixed var ignores v."""
        out = self.model_output(model, xt, t, y) if out is None else out
        eps, v = out.chunk(2, dim=1) if out.shape[1] == 2 * xt.shape[1] else (out, None)
        if self.var == "learned":
            if v is None:
                raise common.UserError("var 'learned' needs a network that outputs [eps, v]; use --var "
                                       "large or small")
            logvar = self.learned_logvar(v, t)
        else:
            fixed = self.large_logvar if self.var == "large" else self.post_logvar
            logvar = common.extract(fixed, t, xt.shape)
        x0 = self.x0_from_eps(xt, t, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, xt, t)
        return {"mean": mean, "logvar": logvar.expand_as(mean), "x0": x0, "eps": eps}

    def vb_terms(self, out, x0, xt, t):
        """The bound's term for each example in bits per dimension: L_{t-1} = KL(q(x_{t-1}|x_t,x_0) ||
        p_theta) for t > 0, L_0 = -log p_theta(x_0 | x_1) (DDPM eq. 13) at t = 0, with p_theta from the output
        `out`."""
        true_mean, true_logvar = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(None, xt, t, clip=False, out=out)
        kl = mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["logvar"])) / math.log(2)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["logvar"])) / math.log(2)
        return torch.where(t == 0, nll, kl)

    def hybrid_loss(self, model, x0, y=None, lam=LAMBDA_VLB):
        """IDDPM eq. 16: L_simple + lambda L_vlb at one uniform t per example, where L_vlb ~ T L_t (bits/dim),
        computed with the mean's output detached (the frozen [eps.detach(), v]), so L_vlb trains only v.
        Fixed variances: L_simple alone (DDPM eq. 14)."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        out = self.model_output(model, xt, t, y)
        eps, v = out.chunk(2, dim=1) if self.var == "learned" else (out, None)
        loss = mean_flat((noise - eps) ** 2)                                                  # L_simple
        if v is not None:
            frozen = torch.cat([eps.detach(), v], dim=1)
            loss = loss + lam * self.T * self.vb_terms(frozen, x0, xt, t)
        return loss.mean()

    def p_sample(self, model, x, t, y=None, clip=True, guide=None):
        """ADM Algorithm 1, one step: x_{t-1} ~ N(mu + s Sigma grad log p(y | x_t), Sigma); no noise at
        t = 0."""
        p = self.p_mean_variance(model, x, t, y, clip)
        mean = p["mean"]
        if guide is not None:
            mean = condition_mean(mean, p["logvar"], guide(x, self.timestep_map[t]))
        nonzero = (t > 0).float().view(-1, *([1] * (x.ndim - 1)))
        return mean + nonzero * (0.5 * p["logvar"]).exp() * torch.randn_like(x)

    def ddim_step(self, model, x, t, y=None, clip=True, guide=None, eta=0.0):
        """ADM Algorithm 2, one step: eps^ = eps(x0_hat) - s sqrt(1 - abar_t) grad log p(y | x_t), with eps
        re-derived from the (clipped) x0_hat and x0_hat recomputed from eps^ (not clipped again), as in the
        official code; then the DDIM step (Song et al. 2021, eq. 12) with sigma(eta), eta = 0 by default."""
        p = self.p_mean_variance(model, x, t, y, clip)
        eps = self.eps_from_x0(x, t, p["x0"])
        x0 = p["x0"]
        if guide is not None:
            eps = condition_score(eps, common.extract(self.abar, t, x.shape),
                                  guide(x, self.timestep_map[t]))
            x0 = self.x0_from_eps(x, t, eps)
        a, a_prev = common.extract(self.abar, t, x.shape), common.extract(self.abar_prev, t, x.shape)
        sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
        direction = (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        return a_prev.sqrt() * x0 + direction + sigma * torch.randn_like(x)

    @torch.no_grad()  # not inference_mode: the classifier's gradient is taken inside
    def sample(self, model, shape, device, y=None, clip=True, guide=None, sampler="ancestral", eta=0.0,
               frames=0, progress=False, x=None):
        """From x_T ~ N(0, I) over this diffusion's T steps (respaced or not) with Algorithm 1 (ancestral) or
        2 (ddim). guide(x, t) -> s grad log p(y | x_t) or None. Returns x_0 and `frames` snapshots of x_t."""
        x = torch.randn(shape, device=device) if x is None else x
        keep = set(torch.linspace(self.T - 1, 0, frames).round().long().tolist()) if frames else set()
        traj = []
        for i in common.steps_bar(reversed(range(self.T)), self.T, f"{sampler} {self.T} steps", progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            if sampler == "ddim":
                x = self.ddim_step(model, x, t, y, clip, guide, eta)
            else:
                x = self.p_sample(model, x, t, y, clip, guide)
            if i in keep:
                traj.append(x.float().cpu())
        return x, traj


def diffusion_from(cfg, var=None, device=None):
    betas = common.beta_schedule(cfg["schedule"], cfg["timesteps"])
    return Diffusion(betas, var or cfg["var"], device=device)


def space_timesteps(T, steps):
    """`steps` timesteps evenly spaced over 0..T-1, both ends included (rounded), as the official respacing
    does for one section: round(i (T - 1) / (steps - 1)). UserError unless 1 <= steps <= T."""
    if not 1 <= steps <= T:
        raise common.UserError(f"--steps {steps}: use 1..{T}, the model's number of timesteps T")
    if steps == 1:
        return [T - 1]
    return sorted({round(i * (T - 1) / (steps - 1)) for i in range(steps)})


def respace(diff, steps):
    """IDDPM Sec. 4: keep abar on the timesteps S of space_timesteps and set beta'_i = 1 - abar_{S_i} /
    abar_{S_{i-1}} (abar before the first is 1): a shorter process with the same q(x_t | x_0) on the kept
    steps. Its beta~' follow from beta', so the learned v interpolates between the respaced bounds."""
    kept = torch.as_tensor(space_timesteps(diff.T, steps))
    abar = torch.cumprod(1 - diff.betas, 0)[kept]          # from the float64 betas, not the float32 copy
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return Diffusion(1 - abar / prev, diff.var, diff.timestep_map.cpu()[kept], diff.device)


def released_diffusion(cfg, var=None, device=None):
    """The diffusion of a released model: IDDPM's linear schedule keeps its ends for any T (betas 1e-4 and
    0.02 times 1000 / T), and a network trained with rescaled timesteps is called at t * 1000 / T."""
    T = cfg["timesteps"]
    betas = common.beta_schedule(cfg["schedule"], T, 1e-4 * (1000 / T), 0.02 * (1000 / T))
    tmap = torch.arange(T).float() * (1000.0 / T) if cfg["rescale_timesteps"] else None
    return Diffusion(betas, var or cfg["var"], tmap, device)


#################################################################################
#                     The paper's maths: classifier guidance                    #
#################################################################################

def cond_fn(classifier, x, t, y, scale):
    """s grad_{x_t} log p_phi(y | x_t, t), taken at x_t (ADM Sec. 4.1): the scale sits here, as in the
    official code. classifier(x, t) -> logits (B, classes); y (B,) long."""
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        logp = F.log_softmax(classifier(x, t).float(), dim=-1)
        picked = logp[torch.arange(len(y), device=y.device), y].sum()
        return scale * torch.autograd.grad(picked, x)[0]


def condition_mean(mean, logvar, grad):
    """ADM Algorithm 1: mu + Sigma g, with g = s grad log p(y | x_t) from cond_fn."""
    return mean + logvar.exp() * grad


def condition_score(eps, abar_t, grad):
    """ADM Algorithm 2 (Sec. 4.2): eps^ = eps - sqrt(1 - abar_t) g, with g = s grad log p(y | x_t)."""
    return eps - (1 - abar_t).sqrt() * grad


def make_guide(classifier, y, scale):
    """guide(x, t) for the samplers, or None when nothing is guided."""
    if classifier is None or scale == 0:
        return None
    return lambda x, t: cond_fn(classifier, x, t, y, scale)


def classifier_loss(clf, diff, x0, y):
    """ADM Sec. 4: cross-entropy of p_phi(y | x_t, t) on x_t = q_sample(x_0, t), t ~ U{0..T-1}."""
    t = torch.randint(0, diff.T, (x0.shape[0],), device=x0.device)
    return F.cross_entropy(clf(diff.q_sample(x0, t, torch.randn_like(x0)), t).float(), y)


#################################################################################
#                The paper's networks: the noise-aware classifier               #
#################################################################################
# The diffusion model is common.UNet with ADM's options (ADM_NET above: AdaGN, BigGAN up/down blocks).

class AttentionPool(nn.Module):
    """ADM's attention pooling (as in CLIP): the mean of the HW tokens, prepended, plus learned position
    embeddings; multi-head attention from that token over all HW + 1, projected to the logits."""

    def __init__(self, ch, n_tokens, heads, out_dim):
        super().__init__()
        self.heads = heads
        self.pos = nn.Parameter(torch.randn(n_tokens + 1, ch) / ch ** 0.5)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, out_dim)

    def forward(self, x):
        B, C, H, W = x.shape
        tok = x.flatten(2).transpose(1, 2)                                          # (B, HW, C)
        tok = torch.cat([tok.mean(1, keepdim=True), tok], 1) + self.pos.to(tok.dtype)
        q, k, v = self.qkv(tok).view(B, H * W + 1, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q[:, :, :1], k, v)              # the pooled token's query only
        return self.proj(h.transpose(1, 2).reshape(B, C))


class Classifier(nn.Module):
    """The noise-aware classifier p_phi(y | x_t, t) of ADM Sec. 4: the U-Net's downsampling half (the same
    AdaGN residual blocks with the time embedding, attention, BigGAN downsampling) and
    its middle block, then GroupNorm, SiLU and attention pooling at the lowest resolution. norm_groups and
    emb_cos_first as in common.UNet (for the released classifiers: 32 groups, [cos, sin])."""

    def __init__(self, num_classes, ch, ch_mult, depth, attn_res, head_channels, image_size, in_ch=3,
                 dropout=0.0, skip_rescale=False, norm_groups=None, emb_cos_first=False):
        super().__init__()
        emb_dim = 4 * ch
        self.ch, self.emb_cos_first = ch, emb_cos_first
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        res_kw = dict(emb_dim=emb_dim, dropout=dropout, scale_shift=True, skip_rescale=skip_rescale,
                      groups=norm_groups)
        heads = lambda c: max(1, c // head_channels)
        attn = lambda c: common.AttnBlock(c, heads(c), skip_rescale=skip_rescale, groups=norm_groups)
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.blocks, c, res = nn.ModuleList(), ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(depth):
                self.blocks.append(common.ResBlock(c, ch * mult, **res_kw))
                c = ch * mult
                if res in attn_res:
                    self.blocks.append(attn(c))
            if level != len(ch_mult) - 1:
                self.blocks.append(common.ResBlock(c, c, down=True, **res_kw))
                res //= 2
        self.blocks.extend([common.ResBlock(c, c, **res_kw), attn(c), common.ResBlock(c, c, **res_kw)])
        self.out_norm = common.norm(c, norm_groups)
        self.pool = AttentionPool(c, res * res, heads(c), num_classes)

    def forward(self, x, t):
        e = self.time_mlp(common.timestep_embedding(t, self.ch, cos_first=self.emb_cos_first))
        h = self.conv_in(x)
        for b in self.blocks:
            h = b(h) if isinstance(b, common.AttnBlock) else b(h, e)
        return self.pool(F.silu(self.out_norm(h)))


def classifier_config(cfg, num_classes):
    """The classifier's plain config, from the diffusion preset's clf_* keys."""
    return {"num_classes": num_classes, "ch": cfg["clf_ch"],
            "ch_mult": list(cfg.get("clf_ch_mult", cfg["ch_mult"])), "depth": cfg["clf_depth"],
            "attn_res": list(cfg["clf_attn_res"]), "head_channels": cfg["head_channels"],
            "image_size": cfg["image_size"], "channels": cfg["channels"], "timesteps": cfg["timesteps"],
            "schedule": cfg["schedule"], "steps": cfg["clf_steps"], "batch_size": cfg["clf_batch"],
            "lr": cfg["clf_lr"], "weight_decay": cfg["clf_wd"],
            "skip_rescale": cfg.get("skip_rescale", False)}


def build_classifier(c):
    return Classifier(c["num_classes"], c["ch"], c["ch_mult"], c["depth"], c["attn_res"], c["head_channels"],
                      c["image_size"], c["channels"], skip_rescale=c.get("skip_rescale", False),
                      norm_groups=c.get("norm_groups"), emb_cos_first=c.get("emb_cos_first", False))


#################################################################################
#                                    Training                                   #
#################################################################################

def labelled_data(args, cfg):
    data = common.load_data(args.data, cfg["image_size"], cfg["channels"], seed=args.seed)
    if not (data.num_classes or 0) >= 2:
        raise common.UserError(f"--data {args.data} has no class labels (put the images in one subfolder per "
                               "class); the classifier and --class-cond need them: use --no-class-cond "
                               "--clf-steps 0")
    return data


def objective(cfg, device):
    """common.train's objective: the hybrid loss (IDDPM eq. 16) and unguided, respaced grids."""
    diff = diffusion_from(cfg, device=device)
    grid_steps = respace(diff, min(DEFAULT_STEPS, diff.T))
    shape = (cfg["channels"], cfg["image_size"], cfg["image_size"])

    def loss_fn(net, x, y, caps):
        return diff.hybrid_loss(net, x, y if cfg["class_cond"] else None)

    def sample_fn(ema, n):
        k = common.unwrap(ema).num_classes
        y = torch.arange(n, device=device) % k if k else None
        return grid_steps.sample(ema, (n, *shape), device, y=y)[0]
    return loss_fn, sample_fn


def train(args, cfg):
    """--train: the diffusion model (common.train with the hybrid loss), then, on rank 0, the classifier and a
    grid from the pair."""
    ck = None
    if args.resume:
        cfg, ck = common.resume_config("guided", args, changeable=("max_steps", "clf_steps"))
    else:
        cfg["out_ch"] = 2 * cfg["channels"] if cfg["var"] == "learned" else cfg["channels"]
        cfg["num_classes"] = "data" if cfg["class_cond"] else None
    space_timesteps(cfg["timesteps"], args.steps or min(DEFAULT_STEPS, cfg["timesteps"]))  # before training
    data = labelled_data(args, cfg) if cfg["class_cond"] or cfg["clf_steps"] > 0 else None
    if cfg["clf_steps"] > 0:
        common.check_batch(data, cfg["clf_batch"], flag="the preset's clf_batch")
    ema, cfg = common.train("guided", args, cfg, common.build_unet, objective, ck=ck, data=data,
                            extra_state=lambda: {"kind": "diffusion"}, final_grid=False)
    if int(os.environ.get("RANK", 0)) != 0:
        return
    device = next(ema.parameters()).device
    clf = train_classifier(args, cfg, data, device) if cfg["clf_steps"] > 0 else None
    # a grid from the trained pair, guided at --scale (default 1) by the classifier
    sample_images(args, device, os.path.join(args.out, "ckpt.pt"), None if clf else 0.0, n=36, gif=False)


@torch.no_grad()
def classifier_accuracy(clf, diff, data, device, n=256, seed=0):
    """Held-out accuracy of the classifier on clean x_0 (t = 0) and on x_t at uniform t."""
    g = torch.Generator().manual_seed(seed)
    idx = list(range(n)) if data.endless else torch.randperm(len(data), generator=g)[:n].tolist()
    x = torch.stack([data[i][0] for i in idx]).to(device)
    y = torch.tensor([data[i][1] for i in idx], device=device)
    t = torch.randint(0, diff.T, (len(x),), generator=g).to(device)
    xt = diff.q_sample(x, t, torch.randn(x.shape, generator=g).to(device))
    acc = lambda xx, tt: (clf(xx, tt).argmax(1) == y).float().mean().item()
    return {"t0": acc(x, torch.zeros_like(t)), "t_uniform": acc(xt, t), "n": len(x)}


def train_classifier(args, cfg, data, device):
    """ADM's classifier through common.train_loop: AdamW (weight decay clf_wd), the lr annealed linearly to 0,
    its own checkpoint <out>/classifier.pt (continued by --resume), then its held-out accuracy."""
    path = os.path.join(args.out, "classifier.pt")
    ccfg = classifier_config(cfg, data.num_classes)
    diff = diffusion_from(cfg, device=device)
    torch.manual_seed(args.seed + CLASSIFIER_SEED)
    clf = build_classifier(ccfg).to(device)
    opt = common.make_optimizer(clf.parameters(), ccfg["lr"], ccfg["weight_decay"], device=device)
    state = {"model": clf, "opt": opt}
    ck = load(path, "classifier")[1] if args.resume and os.path.exists(path) else None
    step = common.restore(state, ck, path)
    if common.already_done("guided: the classifier", step, ccfg["steps"]):
        return clf.eval()
    amp = common.autocast(device, args.dtype)

    def step_fn(step, batch):
        x, y, _ = batch
        common.set_lr(opt, ccfg["lr"] * (1 - step / ccfg["steps"]))
        with amp:
            loss = classifier_loss(clf, diff, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    def save(step, **extra):
        common.save_state(path, state, step, script="guided", kind="classifier", config=ccfg, seed=args.seed,
                          **extra)

    print(f"guided: classifier {common.count_params(clf) / 1e6:.2f}M parameters, steps {step} -> "
          f"{ccfg['steps']}")
    clf.train()
    batches = common.batches(data, ccfg["batch_size"], args.seed + CLASSIFIER_SEED, step,
                             flip=cfg.get("flip", False) and not data.endless)
    step = common.train_loop("classifier", step_fn, save, step, ccfg["steps"], path, cfg, batches, args.seed,
                             stream=CLASSIFIER_STREAM, advice="try a lower clf_lr")
    clf.eval()
    held = common.load_data(args.data, cfg["image_size"], cfg["channels"], seed=args.seed, train=False)
    acc = classifier_accuracy(clf, diff, held, device)
    save(step, accuracy=acc)
    print(f"classifier: held-out accuracy {acc['t0']:.3f} on x_0, {acc['t_uniform']:.3f} on x_t at uniform "
          f"t; {path}")
    return clf


#################################################################################
#                                    Sampling                                   #
#################################################################################

KINDS = {"diffusion": ("the diffusion model; pass the model's ckpt.pt with --ckpt", "ema"),
         "classifier": ("the classifier; pass classifier.pt with --classifier", "model")}


def load(path, kind, device=None):
    """A guided.py checkpoint of `kind` (KINDS) -> (its network on `device` in eval mode, the checkpoint); the
    network is the EMA of a diffusion model. device None: the checkpoint alone (None, checkpoint)."""
    ck = common.load_checkpoint(path, ["guided"])
    if ck.get("kind") != kind:
        raise common.UserError(f"{path} is guided.py's {ck.get('kind', 'unknown')} checkpoint, not "
                               f"{KINDS[kind][0]}")
    if device is None:
        return None, ck
    net = common.build_unet(ck["config"]) if kind == "diffusion" else build_classifier(ck["config"])
    net = common.load_state(net, ck[KINDS[kind][1]], path)
    return net.to(device, memory_format=torch.channels_last).eval(), ck


def load_weights(args, device):
    """--weights: a released ADM or Improved DDPM model (common.load_openai_unet) -> (network, diffusion, a
    checkpoint-like dict)."""
    cfg, model = common.load_openai_unet(args)
    model = model.to(device, memory_format=torch.channels_last).eval()
    ck = {"config": cfg, "step": None, "weights": args.weights}
    return model, released_diffusion(cfg, device=device), ck


class Sampler:
    """The diffusion model (a checkpoint, or --weights), the classifier when guidance needs one, and the CLI's
    sampling options. The scale is --scale, else ADM's default; for released weights, the README's scale with
    a released classifier and no guidance without one."""

    def __init__(self, args, device, ckpt=None, var=None, need_classifier=None, scale=None):
        if args.weights and ckpt is None:
            path, self.what = args.weights, f"released weights {args.weights}"
            self.model, self.diff, self.ck = load_weights(args, device)
        else:
            path = ckpt or args.ckpt or os.path.join(args.out, "ckpt.pt")
            self.model, self.ck = load(path, "diffusion", device)
            self.diff = diffusion_from(self.ck["config"], device=device)
            self.what = f"step-{self.ck['step']} checkpoint"
        self.cfg, self.device, self.args = self.ck["config"], device, args
        var = var or args.var
        if var == "learned" and self.cfg["var"] != "learned":
            raise common.UserError(f"{path} was trained with fixed variances; --var learned needs a model "
                                   "trained with it (the default)")
        if var:
            self.diff = Diffusion(self.diff.betas, var, self.diff.timestep_map.cpu(), device)
        self.scale = args.scale if scale is None else scale
        if self.scale is None and args.weights:
            released = self.cfg.get("guidance_scale") or DEFAULT_SCALE
            self.scale = released if args.classifier_weights else 0.0
        if self.scale is None:
            self.scale = DEFAULT_SCALE
        self.default_steps = self.cfg.get("sample_steps") or min(DEFAULT_STEPS, self.diff.T)
        self.classifier, self.clf_ck = None, None
        if need_classifier or (need_classifier is None and self.scale > 0):
            self.classifier, self.clf_ck = self.load_classifier(path)
        self.num_classes = self.cfg.get("num_classes")
        if self.clf_ck:
            self.num_classes = self.clf_ck["config"]["num_classes"]

    def load_classifier(self, path):
        """The classifier guidance needs: a released one (--classifier-weights) or a guided.py one."""
        a, T = self.args, self.diff.T
        if a.classifier_weights:
            ccfg, clf = common.load_openai_classifier(a.classifier_weights, T, self.cfg["image_size"],
                                                      build_classifier)
            clf = clf.to(self.device, memory_format=torch.channels_last).eval()
            return clf, {"config": ccfg, "step": None}
        if a.weights:
            raise common.UserError(f"--scale {self.scale:g} guides with a classifier: give the released one "
                                   "with --classifier-weights (e.g. 64x64_classifier.pt), or --scale 0")
        cpath = a.classifier or os.path.join(os.path.dirname(os.path.abspath(path)), "classifier.pt")
        if not os.path.exists(cpath):
            raise common.UserError(f"--scale {self.scale:g} needs the classifier, and {cpath} does not "
                                   "exist; train it with `python guided.py --train`, pass --classifier, or "
                                   "use --scale 0")
        clf, ck = load(cpath, "classifier", self.device)
        if ck["config"]["timesteps"] != T:
            raise common.UserError(f"{cpath} was trained for T = {ck['config']['timesteps']} timesteps, the "
                                   f"diffusion model has T = {T}; train them together with `python guided.py "
                                   "--train`")
        return clf, ck

    def labels(self, n, cls=None):
        """The classes of n samples -> (labels or None, grid columns, what): --class K; else one class per
        column, or with more than MAX_COLUMNS classes (ImageNet's 1000) classes drawn at random as the
        official sampler does; None where nothing steers the class."""
        if cls is not None and self.num_classes is None:
            raise common.UserError(f"--class {cls}: this model is unconditional and there is no guidance "
                                   "(--scale 0); give --scale > 0 to steer it with the classifier")
        if cls is not None and not 0 <= cls < self.num_classes:
            raise common.UserError(f"--class {cls}: use 0..{self.num_classes - 1} (the classes this model "
                                   "knows)")
        if cls is not None:
            return [cls] * n, None, f"class {cls}"
        if not self.num_classes or not (self.scale > 0 or self.cfg.get("num_classes")):
            return None, None, "unconditional"
        if self.num_classes > MAX_COLUMNS:
            g = torch.Generator().manual_seed(self.args.seed)
            labels = torch.randint(0, self.num_classes, (n,), generator=g).tolist()
            more = ", ..." if n > 8 else ""
            return labels, None, f"random classes ({', '.join(map(str, labels[:8]))}{more})"
        return [i % self.num_classes for i in range(n)], self.num_classes, "one class per column"

    def sample(self, n, labels, scale, steps, frames=0, progress=False):
        """n images for class labels (n,) (or None: unconditional), guided with `scale`, on `steps` respaced
        steps."""
        c, a = self.cfg, self.args
        diff = respace(self.diff, steps) if steps != self.diff.T else self.diff
        y = None if labels is None else torch.as_tensor(labels, device=self.device).long()
        guide = make_guide(self.classifier, y, scale) if y is not None else None
        with common.autocast(self.device, a.dtype):
            return diff.sample(self.model, (n, c["channels"], c["image_size"], c["image_size"]), self.device,
                               y=y if c.get("num_classes") else None, clip=not a.no_clip, guide=guide,
                               sampler=a.sampler, eta=a.eta or 0.0, frames=frames, progress=progress)


def sample_images(args, device, ckpt=None, scale=None, n=64, gif=True):
    """--sample (and the grid after --train): --n-samples images of --class K, or of every class."""
    s = Sampler(args, device, ckpt, scale=scale)
    steps, n, gif = args.steps or s.default_steps, args.n_samples or n, gif and not args.no_gif
    space_timesteps(s.diff.T, steps)
    labels, nrow, what = s.labels(n, args.cls)
    torch.manual_seed(args.seed)
    frames = min(steps, GIF_FRAMES) if gif else 0
    x, traj = s.sample(n, labels, s.scale, steps, frames=frames, progress=True)
    paths = [os.path.join(args.out, "samples.png")]
    common.save_grid(x, paths[0], nrow)
    if gif:
        paths.append(os.path.join(args.out, "reverse.gif"))
        common.save_gif(traj, paths[1], nrow)
    print(f"{what}, scale {s.scale:g}, {steps} {args.sampler} steps, {s.diff.var} variance, {s.what}: "
          f"wrote {', '.join(paths)}")


#################################################################################
#              Evaluation: guidance scales and respaced steps (Sec. 4)          #
#################################################################################

def evaluate_one(args, device, s, scale, steps, diversity=False):
    """common.evaluate for one setting: samples asked for the held-out images' labels."""
    space_timesteps(s.diff.T, steps)

    def sample_fn(n, wanted):
        if wanted is not None and max(wanted) >= s.num_classes:
            raise common.UserError(f"--data {args.data} has label {max(wanted)}, the model knows "
                                   f"{s.num_classes} classes")
        return s.sample(n, wanted, scale, steps)[0]

    info = {"scale": scale, "steps": steps, "sampler": args.sampler, "var": s.diff.var,
            "ckpt_step": s.ck["step"], **({"weights": s.ck["weights"]} if "weights" in s.ck else {}),
            "class_cond": bool(s.cfg.get("num_classes"))}
    # accuracy too where nothing steers the class (chance level)
    cond = "label" if s.num_classes is not None else None
    return common.evaluate("guided", args, s.cfg, sample_fn, nfe=steps, device=device, cond=cond, info=info,
                           diversity=diversity)


def evaluate(args, device):
    """--eval: FID/KID and accuracy at one --scale; --sweep: the scales (ADM Table 4, Fig. 4: fidelity against
    diversity) and respaced steps (IDDPM Fig. 8) of the papers' trade-offs."""
    if not args.sweep:
        s = Sampler(args, device)
        return evaluate_one(args, device, s, s.scale, args.steps or s.default_steps)
    s = Sampler(args, device, need_classifier=True)
    n, steps = args.n_samples or 1000, args.steps or s.default_steps  # the scale rows' respaced steps

    def scale_row(scale):       # precision: fidelity; recall: diversity
        return {"table": "scale", **evaluate_one(args, device, s, scale, steps, diversity=True)}

    def steps_row(setting):
        name, m, S = setting
        return {"table": "steps", "model": name, **evaluate_one(args, device, m, 0.0, S)}

    rows = common.sweep(args, args.scales or SWEEP_SCALES, scale_row, lambda scale: f"scale{scale:g}")
    models = [("learned", s)]
    if args.baseline:  # IDDPM Fig. 8: the learned sigmas hold up with fewer steps, fixed ones do not
        models += [(f"fixed {v}", Sampler(args, device, ckpt=args.baseline, var=v, need_classifier=False))
                   for v in ("large", "small")]
    settings = [(name, m, S) for name, m in models for S in args.sweep_steps or SWEEP_STEPS if S <= m.diff.T]
    rows += common.sweep(args, settings, steps_row, lambda st: f"{st[0].replace(' ', '_')}_S{st[2]}")
    print(f"\nClassifier guidance at small scale ({n} samples per row, {steps} {args.sampler} steps, judge "
          f"FID; real-vs-real floor {rows[0].get('fid_floor', math.nan):.2f}):")
    common.table([r for r in rows if r["table"] == "scale"], [
        ("scale", "scale", "{:g}"), ("FID", "fid", "{:.2f}"), ("KID", "kid", "{:.4f}"),
        ("accuracy", "acc", "{:.3f}"), ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}")])
    print("\nRespaced sampling, no guidance (judge FID):")
    common.cross_table([r for r in rows if r["table"] == "steps"], "model", "model", "steps", "fid", "{:.2f}")
    common.print_sweep("guided", rows, n)
    return rows


#################################################################################
#                                  Command line                                 #
#################################################################################

def main(argv=None):
    p = common.make_parser("guided", __doc__, PRESETS, gifs=True, weights=(
        "ADM's models (64x64_diffusion.pt, 128x128_diffusion.pt, 256x256_diffusion(_uncond).pt, "
        "lsun_*.pt) and Improved DDPM's (cifar10_uncond_50M_500K.pt, imagenet64_*.pt, ...), from "
        "openai/guided-diffusion and openai/improved-diffusion"))
    p.add_argument("--class", dest="cls", type=common.nonneg_int, goes_with="--sample",
                   help="the class to draw (shapes: 0 circle, 1 square, 2 triangle, 3 cross); default: every "
                        "class, one per column")
    p.add_argument("--scale", type=common.nonneg_float, help=f"classifier guidance scale s >= 0 (default "
                   f"{DEFAULT_SCALE:g}; with --weights, see --classifier-weights; 0: none)")
    p.add_argument("--sampler", default="ancestral", choices=["ancestral", "ddim"],
                   help="ancestral (ADM Algorithm 1, default) or ddim (Algorithm 2)")
    p.add_argument("--eta", type=common.unit_float, goes_with="--sampler ddim",
                   help="the DDIM noise eta in [0, 1] (default 0)")
    p.add_argument("--var", choices=["learned", "large", "small"], help="--train: learned sigmas with the "
                   "hybrid loss (default) or a fixed sigma^2 = beta_t (large) / beta~_t (small) with "
                   "L_simple; --sample/--eval: sample a learned model with a fixed variance instead")
    p.add_argument("--schedule", choices=["cosine", "linear"], goes_with="--train or --weights",
                   help="--train: beta schedule (default cosine); --weights: override the released model's")
    p.add_argument("--class-cond", action=argparse.BooleanOptionalAction, goes_with="--train",
                   help="a class-conditional diffusion model (a class embedding added to the time embedding) "
                   "as ADM-G, the cpu and paper presets' default; --no-class-cond: unconditional, steered by "
                   "the classifier alone (data without labels: with --clf-steps 0)")
    p.add_argument("--clf-steps", type=common.nonneg_int, goes_with="--train",
                   help="classifier training steps (default: the preset's; 0: none)")
    p.add_argument("--classifier", help="classifier checkpoint (default: classifier.pt beside --ckpt)")
    common.add_openai_flags(p)
    p.add_argument("--no-clip", action="store_true", help="do not clip x0_hat to [-1, 1] when sampling")
    p.add_argument("--sweep", action="store_true", goes_with="--eval", excludes=("--scale", "--var"),
                   help=f"scales {SWEEP_SCALES} (FID, KID, accuracy, precision, recall) at --steps "
                        f"(default {DEFAULT_STEPS}), then no guidance at {SWEEP_STEPS} respaced steps; "
                        "--n-samples per row")
    p.add_argument("--scales", type=common.nonneg_float, nargs="+", metavar="S", goes_with="--eval --sweep",
                   help=f"the guidance scales (default {' '.join(f'{x:g}' for x in SWEEP_SCALES)})")
    p.add_argument("--sweep-steps", type=common.positive_int, nargs="+", metavar="N",
                   goes_with="--eval --sweep",
                   help=f"the respaced steps (default {' '.join(map(str, SWEEP_STEPS))})")
    p.add_argument("--baseline", metavar="CKPT", goes_with="--eval --sweep", help="a fixed-variance "
                   "guided.py model (--train --var large) to compare at the same respaced steps, with beta_t "
                   "and beta~_t")
    args = p.parse_args(argv)
    common.check_weights_flags(args)
    cfg = None
    if not args.weights:
        cfg = common.make_config(args, PRESETS, keys=("var", "schedule", "class_cond", "clf_steps"))
    return common.run(args, lambda: train(args, cfg), sample_images, evaluate)


if __name__ == "__main__":
    common.main_guard(main)
