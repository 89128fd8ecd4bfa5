"""
High-Resolution Image Synthesis with Latent Diffusion Models (Rombach et al., 2022), https://arxiv.org/abs/2112.10752
with Classifier-Free Diffusion Guidance (Ho & Salimans, 2022), https://arxiv.org/abs/2207.12598

    python ldm.py --train-ae                       # stage 1 only: the KL autoencoder, <out>/ae.pt
    python ldm.py --train                          # both stages (the autoencoder first if <out>/ae.pt is missing)
    python ldm.py --sample --prompt "a large blue triangle on the right" --scale 3
    python ldm.py --eval --scale 3                 # FID/KID and caption accuracy; JSON last line
    python ldm.py --eval --sweep                   # the same for s in {1, 2, 3, 5, 7.5}
    python ldm.py --eval --recon                   # the autoencoder: reconstruction PSNR and rFID
    python ldm.py --train --cond class             # class labels as the context instead of captions
    python ldm.py --sample --weights v1-5-pruned-emaonly.safetensors \
        --tokenizer bpe_simple_vocab_16e6.txt.gz \
        --prompt "a photograph of an astronaut riding a horse" --scale 7.5   # Stable Diffusion v1.5 (README)

Stage 1, perceptual compression (Sec. 3.1). x (H, W, 3) -> E -> z (H/f, W/f, z_ch) -> D -> x~, with
    q(z | x) = N(mu, diag sigma^2), log sigma^2 clamped to [-30, 20],  z = mu + sigma eps
    L_AE = sum |x - x~| / e^s + s  +  kl_weight KL(q(z|x) || N(0, I))  +  lambda_adapt L_GAN(D, psi)
    KL(N(mu, sigma^2) || N(0, 1)) = 1/2 sum (mu^2 + sigma^2 - 1 - log sigma^2),  kl_weight = 1e-6
    L_GAN: hinge loss of a patch discriminator, switched on after a warm-up, with the generator's weight
    lambda_adapt = ||grad_L L_rec|| / (||grad_L L_GAN|| + 1e-4) at the decoder's last layer L (the adaptive
    weight of Esser et al. 2021, Taming Transformers), times 0.5. No perceptual (LPIPS) term: its weights
    cannot be had offline. s is the log-scale of the reconstruction loss: the official loss declares it as a
    parameter (initialised at 0) but hands it to neither optimizer, so it stays 0; here it is that constant.
    The networks (common.AutoencoderKL: residual levels, mid-block attention) are the released autoencoder's.
Latent scale: z <- z / std(z), the std measured on training data (the role of SD's 0.18215), stored
    in the checkpoint; decoding divides it out again.
Released weights: --weights loads Stable Diffusion v1.x (common.load_stable_diffusion: CLIP's text encoder
    and BPE tokenizer, kl-f8, the 860M U-Net) and samples as its release does (scaled-linear betas, DDIM
    over the timesteps i T / S + 1, guidance against the empty prompt, latents / 0.18215).
Stage 2, diffusion in latent space (Sec. 3.2-3.3), the DDPM objective on z:
    L_LDM = E_{E(x), eps ~ N(0,1), t} || eps - eps_theta(z_t, t) ||^2                           (eq. 2)
    L_LDM = E_{E(x), y, eps ~ N(0,1), t} || eps - eps_theta(z_t, t, tau_theta(y)) ||^2      (eq. 3)
    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, 'linear' schedule = linspace(sqrt b0, sqrt b1)^2
Cross-attention (Sec. 3.3): Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V with Q = W_Q phi(z_t),
    K = W_K tau(y), V = W_V tau(y), inside common.SpatialTransformer blocks; tau = a small transformer over a
    word-level tokenizer built from the training captions, trained jointly from scratch (Sec. 4.3), or a
    class embedding (cin).
Classifier-free guidance: the condition is replaced by the null condition (the empty caption, or the
    null class) 10% of the time in training; sampling uses
    eps~ = eps(z, empty) + s (eps(z, c) - eps(z, empty))         (Ho & Salimans eq. 6, s = 1 + w)
    with DDIM (eta = 0, Song et al. eq. 12) or DDPM ancestral steps (eta = 1) in latent space.
Caption augmentation (ours): p_partial = 20% of the shapes captions lose each of their size, color and position
    phrases with probability 1/2, so that prompts naming fewer attributes ('a circle') are in-distribution.
"""
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

AE_KEYS = ["image_size", "channels", "f", "z_ch", "ae_ch", "ae_mult", "ae_res_blocks", "ae_steps", "ae_batch",
           "ae_lr", "kl_weight", "l2_weight", "disc", "disc_start", "disc_weight", "disc_ch"]
PRESETS = {
    # seconds, for tests
    "tiny": dict(image_size=16, channels=3, f=4, z_ch=4, ae_ch=16, ae_mult=[1, 2, 2, 2], ae_res_blocks=1,
                 ae_steps=10, ae_batch=8, ae_lr=1e-3, kl_weight=1e-6, l2_weight=0.0, disc=True, disc_start=5,
                 disc_weight=0.5, disc_ch=16,
                 cond="text", context_dim=32, text_layers=1, text_heads=2, max_len=12, p_uncond=0.1, p_partial=0.2,
                 scale_n=32,
                 ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_res=[4, 2], heads=2, dropout=0.0,
                 timesteps=1000, schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                 batch_size=8, max_steps=10, lr=1e-3, warmup=0, grad_clip=1.0, ema=0.99,
                 log_every=5, sample_every=0, ckpt_every=10, judge_steps=30),
    # the default: minutes on a 2-core CPU; f=4 turns 32x32x3 into 8x8x4
    "cpu": dict(image_size=32, channels=3, f=4, z_ch=4, ae_ch=32, ae_mult=[1, 2, 4, 4], ae_res_blocks=1,
                ae_steps=1500, ae_batch=32, ae_lr=5e-4, kl_weight=1e-6, l2_weight=0.0, disc=True, disc_start=1000,
                disc_weight=0.5, disc_ch=32,
                cond="text", context_dim=64, text_layers=2, text_heads=4, max_len=16, p_uncond=0.1, p_partial=0.2,
                scale_n=512,
                ch=64, ch_mult=[1, 2], num_res_blocks=2, attn_res=[8, 4], heads=4, dropout=0.0,
                timesteps=1000, schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                batch_size=32, max_steps=2400, lr=1e-3, warmup=100, grad_clip=1.0, ema=0.995,
                log_every=25, sample_every=0, ckpt_every=500),
    # The closest small published configs: the KL-f4 autoencoder (kl_64x64x3: ch 128, ch_mult 1,2,4, 2 res blocks,
    # z 3; --f 8 gives kl_32x32x4's 1,2,4,4) with the LPIPS-less loss, kl_weight 1e-6, discriminator from step
    # 50001 with weight 0.5, Adam(0.5, 0.9) at 4.5e-6 x batch 12; the U-Net of cin256-v2 (ch 192, ch_mult
    # 1,2,3,5, attention at latent 32/16/8 = ds 2,4,8, 1 head, context 512, lr 1e-4) on 256x256 images; 'linear'
    # = scaled_linear 0.0015 .. 0.0195, T = 1000. The text encoder is small (LDM's own is a 32-layer, 1280-wide
    # transformer trained on LAION-400M, far beyond this data).
    "paper": dict(image_size=256, channels=3, f=4, z_ch=3, ae_ch=128, ae_mult=[1, 2, 4, 4], ae_res_blocks=2,
                  ae_steps=200_000, ae_batch=12, ae_lr=5.4e-5, kl_weight=1e-6, l2_weight=0.0, disc=True,
                  disc_start=50_001, disc_weight=0.5, disc_ch=64,
                  cond="text", context_dim=512, text_layers=6, text_heads=8, max_len=77, p_uncond=0.1, p_partial=0.0,
                  scale_n=1024,
                  ch=192, ch_mult=[1, 2, 3, 5], num_res_blocks=2, attn_res=[32, 16, 8], heads=1, dropout=0.0,
                  timesteps=1000, schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                  batch_size=64, max_steps=400_000, lr=1e-4, warmup=10_000, grad_clip=1.0, ema=0.9999,
                  log_every=100, sample_every=10_000, ckpt_every=5000),
}
DEFAULT_STEPS = 50
DEFAULT_SCALE = 3.0
SD_SCALE = 7.5       # Stable Diffusion's released txt2img default
SWEEP_SCALES = [1.0, 2.0, 3.0, 5.0, 7.5]
LOG_SCALE = 0.0       # s of L_AE: the official logvar_init, never trained (see the module docstring)
AE_STREAM = 700_001   # common.step_seed's stream for the autoencoder, apart from the diffusion model's


# ---------------------------------------------------------------------------------------------
# Stage 1: the KL-regularized autoencoder
# ---------------------------------------------------------------------------------------------

def kl_loss(mean, logvar):
    """KL(N(mean, e^logvar) || N(0, I)) = 1/2 sum (mean^2 + e^logvar - 1 - logvar), summed over all but
    the batch dimension -> (B,)."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)


class DiagonalGaussian:
    """q(z | x) = N(mean, diag e^logvar), from common.AutoencoderKL.encode (log-variance already clamped)."""

    def __init__(self, mean, logvar):
        self.mean, self.logvar = mean, logvar
        self.std = (0.5 * logvar).exp()

    def sample(self, generator=None):
        """The reparameterization z = mean + sigma eps."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self):
        return self.mean

    def kl(self):
        return kl_loss(self.mean.float(), self.logvar.float())


def reconstruct(ae, x, sample=True):
    """x -> (D(z), q(z | x)) with z ~ q(z | x), or its mean with sample=False."""
    post = DiagonalGaussian(*ae.encode(x))
    return ae.decode(post.sample() if sample else post.mode()), post


class PatchDiscriminator(nn.Module):
    """pix2pix's 3-layer PatchGAN (GroupNorm in place of BatchNorm): one real/fake logit per patch."""

    def __init__(self, channels=3, ch=64):
        super().__init__()
        lrelu = lambda: nn.LeakyReLU(0.2)
        self.net = nn.Sequential(nn.Conv2d(channels, ch, 4, 2, 1), lrelu(),
                                 nn.Conv2d(ch, 2 * ch, 4, 2, 1), common.norm(2 * ch), lrelu(),
                                 nn.Conv2d(2 * ch, 4 * ch, 4, 1, 1), common.norm(4 * ch), lrelu(),
                                 nn.Conv2d(4 * ch, 1, 4, 1, 1))

    def forward(self, x):
        return self.net(x)


def hinge_d_loss(logits_real, logits_fake):
    """The discriminator's hinge loss: 1/2 (E relu(1 - D(x)) + E relu(1 + D(x~)))."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def adaptive_weight(nll, g_loss, last_layer, disc_weight):
    """lambda = ||grad_L nll|| / (||grad_L g_loss|| + 1e-4), clamped to [0, 1e4], detached, times
    disc_weight: the GAN gradient at the decoder's last layer is scaled to the reconstruction's."""
    g1 = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g2 = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g1.norm() / (g2.norm() + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight


def ae_losses(ae, x, acfg, disc=None, use_gan=False):
    """The generator side of stage 1: nll = sum(|x - x~| (+ l2 (x - x~)^2)) / e^s + s per pixel, summed over
    pixels and averaged over the batch; + kl_weight KL; + lambda g with g = -E D(x~) once the GAN is on."""
    rec, post = reconstruct(ae, x)
    r = (x - rec).abs().float()
    if acfg["l2_weight"]:
        r = r + acfg["l2_weight"] * (x - rec).float().square()
    B = x.shape[0]
    nll = (r / math.exp(LOG_SCALE) + LOG_SCALE).sum() / B
    kl = post.kl().sum() / B
    loss = nll + acfg["kl_weight"] * kl
    logs = {"rec": r.mean().item(), "kl": kl.item()}
    if use_gan:
        g = -disc(rec).float().mean()
        w = adaptive_weight(nll, g, ae.decoder.conv_out.weight, acfg["disc_weight"])
        loss = loss + w * g
        logs.update(g=g.item(), w=w.item())
    return loss, rec, logs


def psnr(x, rec):
    """Per-image PSNR in dB on [0, 1] pixels, averaged: x, rec (N, C, H, W) in [-1, 1]."""
    mse = ((rec.float().clamp(-1, 1) - x.float()) / 2).square().flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


def ae_config(cfg):
    return {k: cfg[k] for k in AE_KEYS}


def load_ae(path):
    """The autoencoder of an ae.pt (or of an LDM checkpoint, which carries its own copy)."""
    if not os.path.exists(path):
        raise common.UserError(f"autoencoder {path} not found; train it with `python ldm.py --train-ae` "
                               "(or --train, which trains it first)")
    ck = common.load_checkpoint(path, ["ldm"])
    if ck.get("kind") == "ldm":
        acfg, sd = ck["ae_config"], ck["ae"]
    elif ck.get("kind") == "autoencoder":
        acfg, sd = ck["config"], ck["model"]
    else:
        raise common.UserError(f"{path} is not an ldm.py autoencoder checkpoint")
    ae = common.load_state(common.AutoencoderKL(acfg), sd, path)
    return ae.eval().requires_grad_(False), acfg, ck


def train_autoencoder(args, cfg, device, path, data=None):
    """Stage 1: Adam(0.5, 0.9) on the autoencoder, another on the discriminator (hinge loss) once
    step >= disc_start. Atomic checkpoint <path>; --resume continues it (only --ae-steps may change); a
    non-finite loss stops training and keeps the last good checkpoint; Ctrl-C saves the current step.
    Returns the autoencoder (eval mode)."""
    acfg = ae_config(cfg)
    ck = None
    if args.resume and os.path.exists(path):
        acfg, ck = common.resume_config("ldm", args, path=path, changeable=("ae_steps",))
        if ck.get("kind") != "autoencoder":
            raise common.UserError(f"{path} is not an ldm.py autoencoder checkpoint")
    data = data or common.load_data(args.data, acfg["image_size"], acfg["channels"], seed=args.seed)
    common.check_batch(data, acfg["ae_batch"], flag="the preset's ae_batch")
    torch.manual_seed(args.seed + 2)
    ae = common.AutoencoderKL(acfg).to(device)
    disc = PatchDiscriminator(acfg["channels"], acfg["disc_ch"]).to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=acfg["ae_lr"], betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=acfg["ae_lr"], betas=(0.5, 0.9))
    step = 0
    if ck is not None:
        ae.load_state_dict(ck["model"])
        disc.load_state_dict(ck["disc"])
        opt.load_state_dict(ck["opt"])
        opt_d.load_state_dict(ck["opt_d"])
        step = ck["step"]
    if common.already_done("ldm: the autoencoder", step, acfg["ae_steps"]):
        return ae.eval().requires_grad_(False)

    def save(step, extra=None):
        if not common.all_finite(ae):
            raise common.UserError(f"autoencoder weights are not finite at step {step}; kept {path}")
        common.save_checkpoint({"script": "ldm", "kind": "autoencoder", "config": acfg, "model": ae.state_dict(),
                                "disc": disc.state_dict(), "opt": opt.state_dict(), "opt_d": opt_d.state_dict(),
                                "step": step, "seed": args.seed, **(extra or {})}, path)

    print(f"ldm: autoencoder f={acfg['f']} ({acfg['image_size']}x{acfg['image_size']}x{acfg['channels']} -> "
          f"{acfg['image_size'] // acfg['f']}x{acfg['image_size'] // acfg['f']}x{acfg['z_ch']}), "
          f"{common.count_params(ae) / 1e6:.2f}M parameters, steps {step} -> {acfg['ae_steps']}, {path}", flush=True)
    it = common.batches(data, acfg["ae_batch"], args.seed + 2, step)
    amp = common.autocast(device, args.dtype)
    ae.train()
    bar = common.Progress(acfg["ae_steps"], step, "autoencoder")
    ckpt_every, log_every = cfg.get("ckpt_every", 1000), cfg.get("log_every", 50)
    with common.GracefulStop() as stop:
        while step < acfg["ae_steps"]:
            torch.manual_seed(common.step_seed(args.seed, step, stream=AE_STREAM))
            x = next(it)[0].to(device)
            use_gan = acfg["disc"] and step >= acfg["disc_start"]
            with amp:
                loss, rec, logs = ae_losses(ae, x, acfg, disc, use_gan)
            if not torch.isfinite(loss):
                raise common.UserError(f"autoencoder loss became {loss.item()} at step {step}; stopped, the last "
                                       f"good checkpoint {path} is kept; try a lower ae_lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if use_gan:
                with amp:
                    d_loss = hinge_d_loss(disc(x).float(), disc(rec.detach()).float())
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                logs["d"] = d_loss.item()
            step += 1
            bar.update(**({k: f"{v:.3g}" for k, v in logs.items()} if step % log_every == 0 else {}))
            if (step % ckpt_every == 0 and step < acfg["ae_steps"]) or stop.requested:
                save(step)
            stop.check(step, acfg["ae_steps"], path)
    bar.close()
    ae.eval()
    held = common.load_data(args.data, acfg["image_size"], acfg["channels"], seed=args.seed, train=False)
    n = min(64, len(held)) if not held.endless else 64
    x = torch.stack([held[i][0] for i in range(n)]).to(device)
    with torch.no_grad():
        rec = reconstruct(ae, x, sample=False)[0].float()
    score = psnr(x, rec)
    save(step, {"psnr": score})
    grid = os.path.join(os.path.dirname(os.path.abspath(path)), "recon.png")
    common.save_grid(torch.stack([x.cpu(), rec.cpu().clamp(-1, 1)], 1).flatten(0, 1)[:64], grid, nrow=8)
    print(f"autoencoder: held-out reconstruction PSNR {score:.2f} dB on {n} images; pairs real | reconstruction "
          f"in {grid}")
    return ae.requires_grad_(False)


@torch.no_grad()
def measure_scale(ae, data, device, n, batch=64, seed=0):
    """1 / std of posterior samples z ~ q(z | x) over the first n training images (LDM's scale_by_std,
    over more than one batch). Scaled latents z / std have unit variance, as the diffusion's prior."""
    g = torch.Generator(device=device).manual_seed(seed)
    zs = []
    for s in range(0, n, batch):
        idx = range(s, min(n, s + batch)) if data.endless else [i % len(data) for i in range(s, min(n, s + batch))]
        x = torch.stack([data[i][0] for i in idx]).to(device)
        zs.append(DiagonalGaussian(*ae.encode(x)).sample(generator=g).float().cpu())
    return 1.0 / torch.cat(zs).std().item()


# ---------------------------------------------------------------------------------------------
# Conditioning: tokenizer, text encoder, class embedding
# ---------------------------------------------------------------------------------------------

def training_captions(data, n=20_000):
    """The captions the vocabulary is built from: the first n of the training data (shapes: from the
    attributes alone, without drawing)."""
    if isinstance(data, common.ShapesData):
        return [common.shape_caption(data.attributes(i)) for i in range(n)]
    return [data[i][2] for i in range(min(n, len(data)))]


def partial_caption(caption, keep):
    """Caption augmentation (ours, not the paper's): shapes captions always name all four attributes, so a
    model trained on them alone has never seen 'a circle' or 'a red square'. keep = 3 booleans for the size,
    color and position phrases; the shape always stays. Captions that are not shapes captions come back
    unchanged. 'a small red circle on the left', (False, True, False) -> 'a red circle'."""
    a = common.parse_caption(caption)
    if len(a) != 4 or common.shape_caption(a) != caption:
        return caption
    words = ["a"] + [a[k] for k, kept in zip(("size", "color"), keep[:2]) if kept] + [a["shape"]]
    return " ".join(words + ([common.POSITION_WORDS[a["position"]]] if keep[2] else []))


class Conditioner:
    """Turns captions or labels into the model's condition c, the null condition, and the 10% drop. tok: a
    released model's tokenizer (CLIP's BPE), else the word-level one of the checkpoint's vocabulary."""

    def __init__(self, cfg, tok=None):
        self.cond = cfg["cond"]
        if tok is None and self.cond == "text":
            tok = common.WordTokenizer(cfg["vocab"], cfg["max_len"])
        self.tok = tok
        self.num_classes = cfg.get("num_classes")

    def __call__(self, captions=None, labels=None):
        if self.cond == "text":
            return self.tok(list(captions))
        return torch.as_tensor(labels, dtype=torch.long)

    def null(self, n):
        """The empty caption ([<bos>]; SD: the empty prompt's [start, end, pad...]) or the null class."""
        return self.tok([""] * n) if self.cond == "text" else torch.full((n,), self.num_classes, dtype=torch.long)

    def drop(self, c, p):
        """Replace each condition by the null one with probability p (classifier-free guidance training)."""
        m = torch.rand(c.shape[0]) < p
        c = c.clone()
        c[m] = self.null(int(m.sum()))
        return c


# ---------------------------------------------------------------------------------------------
# Stage 2: diffusion in latent space, guidance, sampling
# ---------------------------------------------------------------------------------------------

alphas_cumprod = common.alphas_cumprod    # abar_t of the scaled-linear schedule, float64 on the CPU


def q_sample(z0, t, eps, abar):
    """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps (DDPM eq. 4, on latents)."""
    a = common.extract(abar, t, z0.shape)
    return a.sqrt() * z0 + (1 - a).sqrt() * eps


def ldm_loss(net, z0, c, abar):
    """eq. 3, L_LDM = E || eps - eps_theta(z_t, t, tau_theta(y)) ||^2, t ~ U{0..T-1}."""
    t = torch.randint(0, len(abar), (z0.shape[0],), device=z0.device)
    eps = torch.randn_like(z0)
    return F.mse_loss(net(q_sample(z0, t, eps, abar), t, c).float(), eps)


def cfg_eps(eps_cond, eps_uncond, s):
    """Classifier-free guidance: eps~ = eps(z, empty) + s (eps(z, c) - eps(z, empty)); s = 1: the
    conditional model, s = 0: the unconditional one, s > 1: guided (s = 1 + w of Ho & Salimans)."""
    return eps_uncond + s * (eps_cond - eps_uncond)


def guided_eps_fn(model, c, c_null, s):
    """eps_fn(z, t) for an int t with guidance scale s; the context is encoded once, the conditional and
    unconditional predictions come from one batched U-Net call (one evaluation when s is 0 or 1)."""
    ctx, mask = model.context(c)
    nctx, nmask = model.context(c_null)
    both = (torch.cat([ctx, nctx]), None if mask is None else torch.cat([mask, nmask]))

    def eps_fn(z, t):
        tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        if s == 1:
            return model.unet(z, tt, context=ctx, mask=mask).float()
        if s == 0:
            return model.unet(z, tt, context=nctx, mask=nmask).float()
        e = model.unet(torch.cat([z, z]), torch.cat([tt, tt]), context=both[0], mask=both[1]).float()
        e_c, e_u = e.chunk(2)
        return cfg_eps(e_c, e_u, s)
    return eps_fn


def ddim_step(z, eps, a, a_prev, eta=0.0):
    """DDIM (Song et al. eq. 12) with sigma(eta) of eq. 16; eta = 1 is DDPM's ancestral step with the
    posterior variance. z0_hat is not clipped: latents are not bounded like pixels."""
    z0 = (z - (1 - a) ** 0.5 * eps) / a ** 0.5
    sigma = eta * ((1 - a_prev) / (1 - a)) ** 0.5 * (1 - a / a_prev) ** 0.5
    z = a_prev ** 0.5 * z0 + max(0.0, 1 - a_prev - sigma ** 2) ** 0.5 * eps
    return z + sigma * torch.randn_like(z) if sigma > 0 else z


@torch.no_grad()
def sample_latents(eps_fn, z, abar, steps, eta=0.0, progress=False, offset=0):
    """From z_T over the timesteps i T / S + offset, i = S-1 .. 0. offset 0 (ours): the last step ends at
    abar = 1 (not abar_0), so that it returns the predicted z_0 itself (Song et al. 2021, eq. 12 with
    alpha_0 = 1).
    offset 1: Stable Diffusion's released DDIM sampler, whose timesteps are i T / S + 1 and whose last step
    ends at abar_0."""
    T = len(abar)
    if not 1 <= steps <= T:
        raise common.UserError(f"--steps {steps}: use 1..{T}, the model's number of timesteps T")
    ts = [min(i * T // steps + offset, T - 1) for i in range(steps)]
    for i in common.steps_bar(reversed(range(steps)), steps, "sampling", progress):
        a = float(abar[ts[i]])
        a_prev = float(abar[ts[i - 1] if i > 0 else ts[0] - 1]) if i > 0 or ts[0] > 0 else 1.0
        z = ddim_step(z, eps_fn(z, ts[i]), a, a_prev, eta)
    return z


class Sampler:
    """The EMA model, its autoencoder and conditioner from an LDM checkpoint, or Stable Diffusion from
    --weights (weights, tokenizer: their paths; image_size: the sampling size, default the release's 512):
    c -> images."""

    def __init__(self, path, device, weights=None, tokenizer=None, image_size=None):
        if weights:
            self.model, self.ae, tok, self.cfg = common.load_stable_diffusion(weights, tokenizer, image_size)
            self.ck = {"step": None, "weights": weights}
        else:
            self.model, self.ae, self.cfg, self.ck = common.load_ldm(path)
            tok = None
        self.model, self.ae, self.device = self.model.to(device), self.ae.to(device), device
        self.cond, self.abar = Conditioner(self.cfg, tok), alphas_cumprod(self.cfg).tolist()

    @torch.no_grad()
    def sample(self, captions=None, labels=None, scale=DEFAULT_SCALE, steps=DEFAULT_STEPS, eta=0.0, progress=False):
        c = self.cond(captions, labels).to(self.device)
        n, r = c.shape[0], self.cfg["image_size"] // self.cfg["f"]
        eps_fn = guided_eps_fn(self.model, c, self.cond.null(n).to(self.device), scale)
        z = torch.randn(n, self.cfg["z_ch"], r, r, device=self.device)
        z = sample_latents(eps_fn, z, self.abar, steps, eta, progress, self.cfg.get("ddim_offset", 0))
        return self.ae.decode(z / self.cfg["scale_factor"]).float().clamp(-1, 1)


def build_model(cfg):
    return common.LDM(cfg)


def train(args, cfg):
    """--train: the autoencoder first (if <ae> is missing, or unfinished with --resume), then stage 2 through
    common.train."""
    device, rank, world = common.setup_distributed(args.device)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ae_path = args.ae or os.path.join(args.out, "ae.pt")
    ck = None
    if args.resume and (os.path.exists(ckpt_path) or not os.path.exists(ae_path)):
        cfg, ck = common.resume_config("ldm", args)   # stage 2 under way: its checkpoint holds its autoencoder
    data = common.load_data(args.data, cfg["image_size"], cfg["channels"], seed=args.seed)
    common.check_batch(data, cfg["batch_size"], world)
    if ck is None:
        common.check_batch(data, cfg["ae_batch"], flag="the preset's ae_batch")
        stage2_conditions(args, cfg, data)           # no captions / labels: say so before stage 1
        if not os.path.exists(ae_path) or args.resume:
            if world > 1:
                raise common.UserError(f"{ae_path} not found: train the autoencoder first with `python ldm.py "
                                       "--train-ae` in one process")
            train_autoencoder(args, cfg, device, ae_path, data)
    ae, acfg, ae_ck = load_ae(ckpt_path if ck is not None else ae_path)  # resuming: the checkpoint's own copy
    if ck is None:
        if ae_ck.get("step", acfg["ae_steps"]) < acfg["ae_steps"]:
            common.warn(f"{ae_path} stopped at step {ae_ck['step']} of {acfg['ae_steps']}; using it as it is "
                        "(--train --resume would finish it first)")
        for k in ("image_size", "channels", "f"):
            if acfg[k] != cfg[k]:
                raise common.UserError(f"{ae_path} has {k} {acfg[k]} but {cfg[k]} was asked; pass --ae with a "
                                       "matching autoencoder or delete it to train a new one")
        cfg.update(ae_config(acfg))
        cfg["scale_factor"] = measure_scale(ae.to(device), data, device, cfg["scale_n"], seed=args.seed)
        print(f"ldm: latent scale 1/std(z) = {cfg['scale_factor']:.5f} (measured on {cfg['scale_n']} images)")
    ae = ae.to(device)
    r = cfg["image_size"] // cfg["f"]
    cond, abar = Conditioner(cfg), alphas_cumprod(cfg).tolist()
    ae_state = {k: v.cpu() for k, v in ae.state_dict().items()}
    held = common.load_data(args.data, cfg["image_size"], cfg["channels"], seed=args.seed, train=False)

    def grid(ema, n, steps=DEFAULT_STEPS, items=None):
        items = items or common.grid_items(held, n)[0]
        n, caps, labels = len(items), [it[2] for it in items], [it[1] for it in items]
        c = cond(caps, labels).to(device)
        z = torch.randn(n, cfg["z_ch"], r, r, device=device)
        z = sample_latents(guided_eps_fn(ema, c, cond.null(n).to(device), DEFAULT_SCALE), z, abar, steps)
        return ae.decode(z / cfg["scale_factor"]).float().clamp(-1, 1)

    def objective(cfg, device):
        abar_dev = common.on_device(device)(alphas_cumprod(cfg))

        def loss_fn(net, x, y, caps):
            with torch.no_grad():
                z0 = DiagonalGaussian(*ae.encode(x)).sample() * cfg["scale_factor"]
            if cfg["cond"] == "text" and cfg.get("p_partial", 0) > 0:  # a fraction p_partial of the captions
                u = torch.rand(len(caps), 4).tolist()                    # made partial, each phrase kept w.p. 1/2
                caps = [partial_caption(c, [v >= 0.5 for v in r[1:]]) if r[0] < cfg["p_partial"] else c
                        for c, r in zip(caps, u)]
            c = cond.drop(cond(caps, y.cpu()), cfg["p_uncond"]).to(x.device)
            return ldm_loss(net, z0.float(), c, abar_dev)
        return loss_fn, grid

    steps = min(args.steps or DEFAULT_STEPS, cfg["timesteps"])
    ema, cfg = common.train("ldm", args, cfg, build_model, objective, ck=ck, data=data, final_grid=False,
                            extra_state=lambda: {"kind": "ldm", "ae": ae_state, "ae_config": ae_config(acfg)})
    if rank == 0 and not (ck is not None and ck["step"] >= cfg["max_steps"]):
        torch.manual_seed(args.seed)
        items, nrow = common.grid_items(held, args.n_samples or 36)   # evenly over the classes
        with torch.no_grad():
            x = grid(ema.eval(), len(items), steps, items)
        write_grid(x, [it[2 if cfg["cond"] == "text" else 1] for it in items], args.out, nrow)
        print(f"samples (scale {DEFAULT_SCALE:g}, held-out {'captions' if cfg['cond'] == 'text' else 'labels'}, "
              f"see samples.txt): {os.path.join(args.out, 'samples.png')}")


def stage2_conditions(args, cfg, data):
    """The vocabulary (text) or the classes (class) of stage 2, from the data: UserError where there are none."""
    if cfg["cond"] == "text":
        caps = training_captions(data)
        cfg["vocab"] = common.WordTokenizer.build(caps, cfg["max_len"]).vocab
        if len(cfg["vocab"]) == len(common.WordTokenizer.SPECIALS):
            raise common.UserError(f"--data {args.data} has no captions; use --cond class")
    else:
        if not data.num_classes or data.num_classes < 2:
            raise common.UserError(f"--data {args.data} has no class labels; use --cond text with captions")
        cfg["num_classes"] = data.num_classes


def write_grid(x, conditions, out, nrow=None):
    """samples.png and, beside it, samples.txt: the caption or class of each image, row by row."""
    common.save_grid(x, os.path.join(out, "samples.png"), nrow)
    with open(os.path.join(out, "samples.txt"), "w") as f:
        f.write("\n".join(map(str, conditions)) + "\n")


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def check_args(args):
    if (args.prompt is not None or args.label is not None) and not args.sample:
        raise common.UserError(f"{'--prompt' if args.prompt is not None else '--class'} goes with --sample")
    if args.prompt is not None and args.label is not None:
        raise common.UserError("give --prompt (text model) or --class (class model), not both")
    if (args.sweep or args.recon) and not args.eval:
        raise common.UserError(f"{'--sweep' if args.sweep else '--recon'} goes with --eval")
    if args.sweep and args.scale is not None:
        raise common.UserError("--sweep runs every s in {1, 2, 3, 5, 7.5} itself; drop --scale")
    common.check_weights_flags(args)
    if args.weights and not args.sample:
        raise common.UserError("--weights (Stable Diffusion) goes with --sample here; fine-tune it with "
                               "`python dreambooth.py --train --weights ...`")
    if args.weights and args.prompt is None:
        raise common.UserError("--weights: give the text to draw with --prompt")
    if args.tokenizer and not args.weights:
        raise common.UserError("--tokenizer goes with --weights (a model trained here keeps its own vocabulary)")


def eta_steps(args, T):
    eta = args.eta if args.eta is not None else (1.0 if args.sampler == "ddpm" else 0.0)
    steps = args.steps or (T if args.sampler == "ddpm" else DEFAULT_STEPS)
    if not 1 <= steps <= T:
        raise common.UserError(f"--steps {steps}: use 1..{T}, the model's number of timesteps T")
    return eta, steps


def sample_images(args, device):
    """--sample: --n-samples images for --prompt (text) or --class, else for held-out captions/labels."""
    smp = Sampler(args.ckpt or os.path.join(args.out, "ckpt.pt"), device, args.weights, args.tokenizer,
                  args.image_size)
    c = smp.cfg
    eta, steps = eta_steps(args, c["timesteps"])
    asked = args.prompt is not None or args.label is not None
    n = args.n_samples or (1 if args.weights else 16 if asked else 36)
    captions = labels = None
    if c["cond"] == "text":
        if args.label is not None:
            raise common.UserError("this checkpoint is text-conditional: give --prompt, not --class")
        if args.prompt is not None:
            unk = smp.cond.tok.unknown(args.prompt)
            if len(unk) == len(common.WordTokenizer.words(args.prompt)) and args.prompt.strip():
                raise common.UserError(f"--prompt '{args.prompt}': no word the model knows; its vocabulary: "
                                       f"{', '.join(smp.cond.tok.vocab[3:])}")
            if unk:
                print(f"warning: unknown word(s) {', '.join(unk)} in --prompt become <unk>", file=sys.stderr)
            captions = [args.prompt] * n
    else:
        if args.prompt is not None:
            raise common.UserError("this checkpoint is class-conditional: give --class, not --prompt")
        if args.label is not None:
            if not 0 <= args.label < c["num_classes"]:
                raise common.UserError(f"--class {args.label}: use 0..{c['num_classes'] - 1}")
            labels = [args.label] * n
    nrow = None
    if captions is None and labels is None:                              # held-out conditions, evenly over classes
        held = common.load_data(args.data, c["image_size"], c["channels"], seed=args.seed, train=False)
        items, nrow = common.grid_items(held, n)
        n, captions, labels = len(items), [it[2] for it in items], [it[1] for it in items]
    scale = (SD_SCALE if args.weights else DEFAULT_SCALE) if args.scale is None else args.scale
    torch.manual_seed(args.seed)
    t0 = time.time()
    with common.autocast(device, args.dtype):
        x = smp.sample(captions, labels, scale, steps, eta, progress=True)
    path = os.path.join(args.out, "samples.png")
    write_grid(x, captions if c["cond"] == "text" else labels, args.out, nrow)
    what = f"'{args.prompt}'" if args.prompt is not None else (f"class {args.label}" if args.label is not None
                                                                else "held-out conditions")
    print(f"{n} samples for {what}, scale {scale:g}, {steps} steps (eta {eta:g}), {time.time() - t0:.2f}s: {path} "
          f"(conditions in samples.txt){'; released weights ' + args.weights if args.weights else ''}")


def evaluate(args, device):
    """--eval: FID/KID and caption (or class) accuracy at one scale, or with --sweep for every s."""
    smp = Sampler(args.ckpt or os.path.join(args.out, "ckpt.pt"), device)
    c = smp.cfg
    eta, steps = eta_steps(args, c["timesteps"])

    def run(scale):
        def sample_fn(n, wanted):
            with common.autocast(device, args.dtype):
                if c["cond"] == "text":
                    return smp.sample(captions=wanted, scale=scale, steps=steps, eta=eta)
                return smp.sample(labels=wanted, scale=scale, steps=steps, eta=eta)
        nfe = steps * (1 if scale in (0, 1) else 2)
        info = {"scale": scale, "steps": steps, "eta": eta, "cond": c["cond"], "f": c["f"],
                "ckpt_step": smp.ck["step"]}
        return common.evaluate("ldm", args, c, sample_fn, nfe=nfe, device=device,
                               cond="caption" if c["cond"] == "text" else "label", info=info)

    if not args.sweep:
        return run(DEFAULT_SCALE if args.scale is None else args.scale)
    rows, out = [], args.out
    for s in SWEEP_SCALES:
        args.out = os.path.join(out, f"sweep_s{s:g}")
        rows.append(run(s))
    args.out = out
    print("\n| s | FID | KID | accuracy | sec/image |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scale']:g} | {r['fid']:.2f} | {r['kid']:.4f} | {r['acc']:.3f} | {r['sec_per_image']:.4f} |")
    print(json.dumps({"script": "ldm", "mode": "sweep", "rows": rows}))
    return rows


@torch.no_grad()
def evaluate_ae(args, device):
    """--eval --recon: reconstruction PSNR and rFID (judge features; Inception with --fid-weights) of the
    autoencoder on --n-samples held-out images, with the posterior mean as z."""
    path = args.ae or (args.ckpt if args.ckpt else os.path.join(args.out, "ae.pt"))
    ae, acfg, ck = load_ae(path)
    ae = ae.to(device)
    n = args.n_samples or 1000
    held = common.load_data(args.data, acfg["image_size"], acfg["channels"], train=False)
    idx = range(n) if held.endless else range(min(n, len(held)))
    x = torch.stack([held[i][0] for i in idx])
    bs = args.batch_size or 100
    rec = torch.cat([reconstruct(ae, x[i:i + bs].to(device), sample=False)[0].float().cpu()
                     for i in range(0, len(x), bs)])
    rec = common.quantize(rec)
    judge = common.get_judge(args.data, acfg["image_size"], acfg["channels"], device,
                             steps=PRESETS[args.preset].get("judge_steps", common.JUDGE_STEPS))
    res = {"script": "ldm", "mode": "recon", "f": acfg["f"], "z_ch": acfg["z_ch"], "n": len(x),
           "psnr": psnr(x, rec), "rfid": common.fid_kid(judge, rec, x)["fid"]}
    if args.fid_weights:
        res["rfid_inception"] = common.fid_kid(common.InceptionFID.load(args.fid_weights).to(device), rec, x)["fid"]
    print(f"autoencoder {path}: PSNR {res['psnr']:.2f} dB, rFID (judge) {res['rfid']:.4f} on {len(x)} held-out images")
    print(json.dumps(res))
    return res


def main(argv=None):
    p = common.make_parser("ldm", __doc__, PRESETS,
                           modes=[("--train-ae", "train only stage 1, the KL autoencoder (<out>/ae.pt)")],
                           weights="Stable Diffusion v1.x, a CompVis file (v1-5-pruned-emaonly.safetensors, "
                                   "sd-v1-4.ckpt) or a diffusers folder; --sample only, with --prompt")
    p.add_argument("--tokenizer", metavar="PATH", help="with --weights: CLIP's bpe_simple_vocab_16e6.txt.gz or a "
                   "tokenizer/ folder (vocab.json, merges.txt); a diffusers folder needs none")
    p.add_argument("--cond", choices=["text", "class"], help="condition on captions (default) or class labels")
    p.add_argument("--f", type=int, choices=[4, 8], help="the autoencoder's downsampling factor (default 4)")
    p.add_argument("--ae", metavar="PATH", help="the autoencoder checkpoint (default <out>/ae.pt)")
    p.add_argument("--ae-steps", type=common.nonneg_int, help="autoencoder training steps (default: from the preset)")
    p.add_argument("--prompt", help="--sample: the caption to draw (text models)")
    p.add_argument("--class", dest="label", type=common.nonneg_int, help="--sample: the class to draw (class models)")
    p.add_argument("--scale", type=common.nonneg_float, help=f"classifier-free guidance scale s (default "
                   f"{DEFAULT_SCALE:g}; 1: conditional, 0: unconditional)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"],
                   help=f"ddim (eta 0, {DEFAULT_STEPS} steps, default) or ddpm (ancestral, eta 1, all T steps)")
    p.add_argument("--eta", type=common.unit_float, help="DDIM's eta in [0, 1] (overrides --sampler's)")
    p.add_argument("--sweep", action="store_true", help="--eval: every s in {1, 2, 3, 5, 7.5}")
    p.add_argument("--recon", action="store_true", help="--eval: the autoencoder's reconstruction PSNR and rFID")
    args = p.parse_args(argv)
    check_args(args)
    cfg = common.make_config(args, PRESETS, keys=("cond", "f", "ae_steps"))
    with common.claim_out(args.out):
        if args.train_ae:
            return train_autoencoder(args, cfg, common.get_device(args.device), args.ae or os.path.join(args.out, "ae.pt"))
        if args.train:
            return train(args, cfg)
        device = common.get_device(args.device)
        if args.eval:
            return evaluate_ae(args, device) if args.recon else evaluate(args, device)
        return sample_images(args, device)


if __name__ == "__main__":
    common.main_guard(main)
