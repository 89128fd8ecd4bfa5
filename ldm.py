"""
High-Resolution Image Synthesis with Latent Diffusion Models (Rombach et al., 2022),
https://arxiv.org/abs/2112.10752, with Classifier-Free Diffusion Guidance (Ho & Salimans, 2022),
https://arxiv.org/abs/2207.12598

    python ldm.py --train-ae                       # stage 1 only: the KL autoencoder, <out>/ae.pt
    python ldm.py --train                          # both stages (first the autoencoder, without <out>/ae.pt)
    python ldm.py --sample --prompt "a large blue triangle on the right" --scale 3
    python ldm.py --eval --scale 3                 # FID/KID and caption accuracy; JSON last line
    python ldm.py --eval --sweep                   # the same for s in {1, 2, 3, 5, 7.5}
    python ldm.py --eval --recon                   # the autoencoder: reconstruction PSNR and rFID
    python ldm.py --train --cond class             # class labels as the context instead of captions
    python ldm.py --sample --weights v1-5-pruned-emaonly.safetensors \\
        --tokenizer bpe_simple_vocab_16e6.txt.gz \\
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
    with DDIM (eta = 0, Song et al. eq. 12) or DDPM ancestral steps (eta = 1) in latent space. dreambooth.py
    draws the same way, so both take this sampler from common.py (common.cfg_eps, common.sample_latents).
Caption augmentation (ours): p_partial = 20% of the shapes captions lose each of their size, color and
    position phrases with probability 1/2, so that prompts naming fewer attributes ('a circle') are
    in-distribution.
"""
import json
import math
import os
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
                 cond="text", context_dim=32, text_layers=1, text_heads=2, max_len=12, p_uncond=0.1,
                 p_partial=0.2, scale_n=32,
                 ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_res=[4, 2], heads=2, dropout=0.0,
                 timesteps=1000, schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                 batch_size=8, max_steps=10, lr=1e-3, warmup=0, grad_clip=1.0, ema=0.99,
                 log_every=5, sample_every=0, ckpt_every=10, judge_steps=30),
    # the default: minutes on a 2-core CPU; f=4 turns 32x32x3 into 8x8x4
    "cpu": dict(image_size=32, channels=3, f=4, z_ch=4, ae_ch=32, ae_mult=[1, 2, 4, 4], ae_res_blocks=1,
                ae_steps=1500, ae_batch=32, ae_lr=5e-4, kl_weight=1e-6, l2_weight=0.0, disc=True,
                disc_start=1000, disc_weight=0.5, disc_ch=32,
                cond="text", context_dim=64, text_layers=2, text_heads=4, max_len=16, p_uncond=0.1,
                p_partial=0.2, scale_n=512,
                ch=64, ch_mult=[1, 2], num_res_blocks=2, attn_res=[8, 4], heads=4, dropout=0.0,
                timesteps=1000, schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                batch_size=32, max_steps=2400, lr=1e-3, warmup=100, grad_clip=1.0, ema=0.995,
                log_every=25, sample_every=0, ckpt_every=500),
    # The closest small published configs: the KL-f4 autoencoder (kl_64x64x3: ch 128, ch_mult 1,2,4, 2 res
    # blocks, z 3; --f 8 gives kl_32x32x4's 1,2,4,4) with the LPIPS-less loss, kl_weight 1e-6, discriminator
    # from step 50001 with weight 0.5, Adam(0.5, 0.9) at 4.5e-6 x batch 12; the U-Net of cin256-v2 (ch 192,
    # ch_mult 1,2,3,5, attention at latent 32/16/8 = ds 2,4,8, 1 head, context 512, lr 1e-4) on 256x256
    # images; 'linear' = scaled_linear 0.0015 .. 0.0195, T = 1000. The text encoder is small (LDM's own is a
    # 32-layer, 1280-wide transformer trained on LAION-400M, far beyond this data).
    "paper": dict(image_size=256, channels=3, f=4, z_ch=3, ae_ch=128, ae_mult=[1, 2, 4, 4], ae_res_blocks=2,
                  ae_steps=200_000, ae_batch=12, ae_lr=5.4e-5, kl_weight=1e-6, l2_weight=0.0, disc=True,
                  disc_start=50_001, disc_weight=0.5, disc_ch=64,
                  cond="text", context_dim=512, text_layers=6, text_heads=8, max_len=77, p_uncond=0.1,
                  p_partial=0.0, scale_n=1024,
                  ch=192, ch_mult=[1, 2, 3, 5], num_res_blocks=2, attn_res=[32, 16, 8], heads=1, dropout=0.0,
                  timesteps=1000, schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                  batch_size=64, max_steps=400_000, lr=1e-4, warmup=10_000, grad_clip=1.0, ema=0.9999,
                  log_every=100, sample_every=10_000, ckpt_every=5000),
}
DEFAULT_STEPS = 50
DEFAULT_SCALE = 3.0
SD_SCALE = 7.5        # Stable Diffusion's released txt2img default
SWEEP_SCALES = [1.0, 2.0, 3.0, 5.0, 7.5]
LOG_SCALE = 0.0       # s of L_AE: the official logvar_init, never trained (see the module docstring)
AE_SEED = 2           # --seed + this: the autoencoder's initialization and data order
AE_STREAM = 700_001   # common.step_seed's stream for the autoencoder, apart from the diffusion model's


#################################################################################
#         The paper's maths: stage 1, perceptual compression (Sec. 3.1)         #
#################################################################################

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
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self):
        return self.mean

    def kl(self):
        return kl_loss(self.mean.float(), self.logvar.float())


def reconstruct(ae, x, sample=True):
    """x -> (D(z), q(z | x)) with z ~ q(z | x), or its mean with sample=False."""
    post = DiagonalGaussian(*ae.encode(x))
    return ae.decode(post.sample() if sample else post.mode()), post


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
    logs = {"rec": r.mean().detach(), "kl": kl.detach()}
    if use_gan:
        g = -disc(rec).float().mean()
        w = adaptive_weight(nll, g, ae.decoder.conv_out.weight, acfg["disc_weight"])
        loss = loss + w * g
        logs.update(g=g.detach(), w=w)
    return loss, rec, logs


@torch.no_grad()
def measure_scale(ae, data, device, n, batch=64, seed=0):
    """1 / std of posterior samples z ~ q(z | x) over the first n training images (LDM's scale_by_std,
    over more than one batch). Scaled latents z / std have unit variance, as the diffusion's prior."""
    g = torch.Generator(device=device).manual_seed(seed)
    zs = []
    for s in range(0, n, batch):
        idx = range(s, min(n, s + batch))
        idx = idx if data.endless else [i % len(data) for i in idx]
        x = torch.stack([data[i][0] for i in idx]).to(device)
        zs.append(DiagonalGaussian(*ae.encode(x)).sample(generator=g).float().cpu())
    return 1.0 / torch.cat(zs).std().item()


#################################################################################
#            The paper's maths: stage 2, conditional latent diffusion           #
#################################################################################
# Sec. 3.2-3.3; guided sampling is common.py's (cfg_eps, sample_latents), shared with dreambooth.py.

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
        if self.cond == "text":
            return self.tok([""] * n)
        return torch.full((n,), self.num_classes, dtype=torch.long)

    def drop(self, c, p):
        """Replace each condition by the null one with probability p (classifier-free guidance training)."""
        m = torch.rand(c.shape[0]) < p
        c = c.clone()
        c[m] = self.null(int(m.sum()))
        return c


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


def augment_captions(captions, p_partial):
    """A fraction p_partial of the captions made partial (partial_caption), each phrase kept with
    probability 1/2."""
    u = torch.rand(len(captions), 4).tolist()
    return [partial_caption(c, [v >= 0.5 for v in r[1:]]) if r[0] < p_partial else c
            for c, r in zip(captions, u)]


#################################################################################
#                 The paper's networks: the patch discriminator                 #
#################################################################################
# The autoencoder, the latent U-Net with cross-attention and the text encoder are common.py's
# (AutoencoderKL, LDM), shared with dreambooth.py and Stable Diffusion's released weights.

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


#################################################################################
#                                    Training                                   #
#################################################################################

def ae_config(cfg):
    return {k: cfg[k] for k in AE_KEYS}


def train_autoencoder(args, cfg, device, path, data=None):
    """Stage 1 through common.train_loop: Adam(0.5, 0.9) on the autoencoder, another on the discriminator
    (hinge loss) once step >= disc_start; checkpoint <path>, continued by --resume (only --ae-steps may
    change). Then the held-out reconstruction PSNR and recon.png. Returns the autoencoder (eval mode)."""
    acfg, ck = ae_config(cfg), None
    if args.resume and os.path.exists(path):
        acfg, ck = common.resume_config("ldm", args, path=path, changeable=("ae_steps",))
        if ck.get("kind") != "autoencoder":
            raise common.UserError(f"{path} is not an ldm.py autoencoder checkpoint")
    data = data or common.load_data(args.data, acfg["image_size"], acfg["channels"], seed=args.seed)
    common.check_batch(data, acfg["ae_batch"], flag="the preset's ae_batch")
    torch.manual_seed(args.seed + AE_SEED)
    ae = common.AutoencoderKL(acfg).to(device)
    disc = PatchDiscriminator(acfg["channels"], acfg["disc_ch"]).to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=acfg["ae_lr"], betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=acfg["ae_lr"], betas=(0.5, 0.9))
    state = {"model": ae, "disc": disc, "opt": opt, "opt_d": opt_d}
    step = common.restore(state, ck, path)
    if common.already_done("ldm: the autoencoder", step, acfg["ae_steps"]):
        return ae.eval().requires_grad_(False)
    amp = common.autocast(device, args.dtype)

    def step_fn(step, batch):
        x = batch[0].to(device)
        use_gan = acfg["disc"] and step >= acfg["disc_start"]
        with amp:
            loss, rec, logs = ae_losses(ae, x, acfg, disc, use_gan)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if use_gan:
            with amp:
                d_loss = hinge_d_loss(disc(x).float(), disc(rec.detach()).float())
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            logs["d"] = d_loss.detach()
        return logs

    def save(step, **extra):
        common.save_state(path, state, step, script="ldm", kind="autoencoder", config=acfg, seed=args.seed,
                          **extra)

    size, f = acfg["image_size"], acfg["f"]
    shapes = f"{size}x{size}x{acfg['channels']} -> {size // f}x{size // f}x{acfg['z_ch']}"
    print(f"ldm: autoencoder f={f} ({shapes}), {common.count_params(ae) / 1e6:.2f}M parameters, "
          f"steps {step} -> {acfg['ae_steps']}, {path}", flush=True)
    ae.train()
    batches = common.batches(data, acfg["ae_batch"], args.seed + AE_SEED, step)
    step = common.train_loop("autoencoder", step_fn, save, step, acfg["ae_steps"], path, cfg, batches,
                             args.seed, stream=AE_STREAM, advice="try a lower ae_lr")
    ae.eval()
    held = common.load_data(args.data, size, acfg["channels"], seed=args.seed, train=False)
    n = 64 if held.endless else min(64, len(held))
    x = torch.stack([held[i][0] for i in range(n)]).to(device)
    with torch.no_grad():
        rec = reconstruct(ae, x, sample=False)[0].float()
    score = common.psnr(x, rec)
    save(step, psnr=score)
    grid = os.path.join(os.path.dirname(os.path.abspath(path)), "recon.png")
    common.save_grid(torch.stack([x.cpu(), rec.cpu().clamp(-1, 1)], 1).flatten(0, 1)[:64], grid, nrow=8)
    print(f"autoencoder: held-out reconstruction PSNR {score:.2f} dB on {n} images; pairs real | "
          f"reconstruction in {grid}")
    return ae.requires_grad_(False)


def training_captions(data, n=20_000):
    """The captions the vocabulary is built from: the first n of the training data (shapes: from the
    attributes alone, without drawing)."""
    if isinstance(data, common.ShapesData):
        return [common.shape_caption(data.attributes(i)) for i in range(n)]
    return [data[i][2] for i in range(min(n, len(data)))]


def stage2_conditions(args, cfg, data):
    """The vocabulary (text) or the classes (class) of stage 2, from the data: UserError where there are
    none."""
    if cfg["cond"] == "text":
        cfg["vocab"] = common.WordTokenizer.build(training_captions(data), cfg["max_len"]).vocab
        if len(cfg["vocab"]) == len(common.WordTokenizer.SPECIALS):
            raise common.UserError(f"--data {args.data} has no captions; use --cond class")
    else:
        if not data.num_classes or data.num_classes < 2:
            raise common.UserError(f"--data {args.data} has no class labels; use --cond text with captions")
        cfg["num_classes"] = data.num_classes


def stage1(args, cfg, device, world, data, ae_path):
    """The autoencoder stage 2 starts from: trained first where <ae> is missing (or unfinished, with
    --resume), checked against the asked image size, and its latent scale 1/std(z) measured into cfg."""
    if not os.path.exists(ae_path) or args.resume:
        if world > 1:
            raise common.UserError(f"{ae_path} not found: train the autoencoder first with `python ldm.py "
                                   "--train-ae` in one process")
        train_autoencoder(args, cfg, device, ae_path, data)
    ae, acfg, ae_ck = common.load_ae(ae_path)
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
    return ae


def train(args, cfg):
    """--train: the autoencoder first (stage1), then stage 2 through common.train: eq. 3 on the scaled latents
    of the frozen autoencoder, the condition dropped to the null one p_uncond of the time. --train-ae: stage 1
    alone."""
    ckpt_path, ae_path = os.path.join(args.out, "ckpt.pt"), args.ae or os.path.join(args.out, "ae.pt")
    ck = None
    if args.train_ae:
        return train_autoencoder(args, cfg, common.get_device(args.device), ae_path)
    device, rank, world = common.setup_distributed(args.device)
    if args.resume and (os.path.exists(ckpt_path) or not os.path.exists(ae_path)):
        cfg, ck = common.resume_config("ldm", args)  # stage 2 under way: its checkpoint holds its autoencoder
    data = common.load_data(args.data, cfg["image_size"], cfg["channels"], seed=args.seed)
    common.check_batch(data, cfg["batch_size"], world)
    if ck is None:
        common.check_batch(data, cfg["ae_batch"], flag="the preset's ae_batch")
        stage2_conditions(args, cfg, data)           # no captions / labels: say so before stage 1
        ae = stage1(args, cfg, device, world, data, ae_path)
        acfg = ae_config(cfg)
    else:
        ae, acfg, _ = common.load_ae(ckpt_path)      # resuming: the checkpoint's own copy
    ae = ae.to(device)
    cond = Conditioner(cfg)
    ae_state = {k: v.cpu() for k, v in ae.state_dict().items()}
    held = common.load_data(args.data, cfg["image_size"], cfg["channels"], seed=args.seed, train=False)

    def grid(ema, n, steps=DEFAULT_STEPS, items=None):
        items = items or common.grid_items(held, n)[0]
        c = cond([it[2] for it in items], [it[1] for it in items]).to(device)
        return common.draw_latent(ema, ae, cfg, c, cond.null(len(items)).to(device), DEFAULT_SCALE, steps)

    def objective(cfg, device):
        abar = common.on_device(device)(alphas_cumprod(cfg))

        def loss_fn(net, x, y, caps):
            with torch.no_grad():
                z0 = DiagonalGaussian(*ae.encode(x)).sample() * cfg["scale_factor"]
            if cfg["cond"] == "text" and cfg.get("p_partial", 0) > 0:
                caps = augment_captions(caps, cfg["p_partial"])
            c = cond.drop(cond(caps, y.cpu()), cfg["p_uncond"]).to(x.device)
            return ldm_loss(net, z0.float(), c, abar)
        return loss_fn, grid

    steps = min(args.steps or DEFAULT_STEPS, cfg["timesteps"])
    extra = {"kind": "ldm", "ae": ae_state, "ae_config": acfg}
    ema, cfg = common.train("ldm", args, cfg, common.LDM, objective, ck=ck, data=data, final_grid=False,
                            extra_state=lambda: extra)
    if rank == 0 and not (ck is not None and ck["step"] >= cfg["max_steps"]):
        torch.manual_seed(args.seed)
        items, nrow = common.grid_items(held, args.n_samples or 36)   # evenly over the classes
        with torch.no_grad():
            x = grid(ema.eval(), len(items), steps, items)
        write_grid(x, [it[2 if cfg["cond"] == "text" else 1] for it in items], args.out, nrow)
        what = "captions" if cfg["cond"] == "text" else "labels"
        print(f"samples (scale {DEFAULT_SCALE:g}, held-out {what}, see samples.txt): "
              f"{os.path.join(args.out, 'samples.png')}")


#################################################################################
#                                    Sampling                                   #
#################################################################################

class Sampler:
    """The EMA model, its autoencoder and conditioner from an LDM checkpoint, or Stable Diffusion from
    --weights (weights, tokenizer: their paths; image_size: the sampling size, default the release's 512):
    c -> images, drawn by common.draw_latent."""

    def __init__(self, path, device, weights=None, tokenizer=None, image_size=None):
        tok = None
        if weights:
            self.model, self.ae, tok, self.cfg = common.load_stable_diffusion(weights, tokenizer, image_size)
            self.ck = {"step": None, "weights": weights}
        else:
            self.model, self.ae, self.cfg, self.ck = common.load_ldm(path)
        self.model, self.ae, self.device = self.model.to(device), self.ae.to(device), device
        self.cond = Conditioner(self.cfg, tok)

    def sample(self, captions=None, labels=None, scale=DEFAULT_SCALE, steps=DEFAULT_STEPS, eta=0.0,
               progress=False):
        c = self.cond(captions, labels).to(self.device)
        null = self.cond.null(c.shape[0]).to(self.device)
        return common.draw_latent(self.model, self.ae, self.cfg, c, null, scale, steps, eta, progress)


def eta_steps(args, T):
    """--sampler's eta and steps: ddim (eta 0, 50 steps) or ddpm (eta 1, all T), --eta and --steps first."""
    ddpm = args.sampler == "ddpm"
    eta = args.eta if args.eta is not None else float(ddpm)
    steps = args.steps or (T if ddpm else DEFAULT_STEPS)
    if not 1 <= steps <= T:
        raise common.UserError(f"--steps {steps}: use 1..{T}, the model's number of timesteps T")
    return eta, steps


def write_grid(x, conditions, out, nrow=None):
    """samples.png and, beside it, samples.txt: the caption or class of each image, row by row."""
    common.save_grid(x, os.path.join(out, "samples.png"), nrow)
    with open(os.path.join(out, "samples.txt"), "w") as f:
        f.write("\n".join(map(str, conditions)) + "\n")


def asked_conditions(args, smp, n):
    """--prompt's captions or --class's labels for n images, checked against the model; (None, None)
    without either."""
    c = smp.cfg
    if c["cond"] == "text" and args.label is not None:
        raise common.UserError("this checkpoint is text-conditional: give --prompt, not --class")
    if c["cond"] == "class" and args.prompt is not None:
        raise common.UserError("this checkpoint is class-conditional: give --class, not --prompt")
    if args.label is not None:
        if not 0 <= args.label < c["num_classes"]:
            raise common.UserError(f"--class {args.label}: use 0..{c['num_classes'] - 1}")
        return None, [args.label] * n
    if args.prompt is None:
        return None, None
    common.check_prompt(smp.cond.tok, args.prompt)
    return [args.prompt] * n, None


def sample_images(args, device):
    """--sample: --n-samples images for --prompt (text) or --class, else for held-out captions or labels,
    evenly over the classes."""
    smp = Sampler(args.ckpt or os.path.join(args.out, "ckpt.pt"), device, args.weights, args.tokenizer,
                  args.image_size)
    c = smp.cfg
    eta, steps = eta_steps(args, c["timesteps"])
    asked = args.prompt is not None or args.label is not None
    n = args.n_samples or (16 if asked else 36)
    if args.weights and not args.n_samples:
        n = 1                                        # Stable Diffusion: one 512px image at a time
    captions, labels = asked_conditions(args, smp, n)
    nrow, what = None, "held-out conditions"
    if asked:
        what = f"'{args.prompt}'" if args.prompt is not None else f"class {args.label}"
    else:
        held = common.load_data(args.data, c["image_size"], c["channels"], seed=args.seed, train=False)
        items, nrow = common.grid_items(held, n)
        n, captions, labels = len(items), [it[2] for it in items], [it[1] for it in items]
    scale = args.scale
    if scale is None:
        scale = SD_SCALE if args.weights else DEFAULT_SCALE
    torch.manual_seed(args.seed)
    t0 = time.time()
    with common.autocast(device, args.dtype):
        x = smp.sample(captions, labels, scale, steps, eta, progress=True)
    write_grid(x, captions if c["cond"] == "text" else labels, args.out, nrow)
    released = f"; released weights {args.weights}" if args.weights else ""
    print(f"{n} samples for {what}, scale {scale:g}, {steps} steps (eta {eta:g}), {time.time() - t0:.2f}s: "
          f"{os.path.join(args.out, 'samples.png')} (conditions in samples.txt){released}")


#################################################################################
#                Evaluation: guidance scales and the autoencoder                #
#################################################################################

def evaluate(args, device):
    """--eval: FID/KID and caption (or class) accuracy at one scale, or with --sweep for every s (or
    --recon)."""
    if args.recon:
        return evaluate_ae(args, device)
    smp = Sampler(args.ckpt or os.path.join(args.out, "ckpt.pt"), device)
    c = smp.cfg
    eta, steps = eta_steps(args, c["timesteps"])
    text = c["cond"] == "text"

    def run(scale):
        def sample_fn(n, wanted):
            with common.autocast(device, args.dtype):
                kind = "captions" if text else "labels"
                return smp.sample(**{kind: wanted}, scale=scale, steps=steps, eta=eta)
        nfe = steps * (1 if scale in (0, 1) else 2)
        info = {"scale": scale, "steps": steps, "eta": eta, "cond": c["cond"], "f": c["f"],
                "ckpt_step": smp.ck["step"]}
        return common.evaluate("ldm", args, c, sample_fn, nfe=nfe, device=device,
                               cond="caption" if text else "label", info=info)

    if not args.sweep:
        return run(DEFAULT_SCALE if args.scale is None else args.scale)
    rows = common.sweep(args, SWEEP_SCALES, run, lambda s: f"s{s:g}")
    common.table(rows, [("s", "scale", "{:g}"), ("FID", "fid", "{:.2f}"), ("KID", "kid", "{:.4f}"),
                        ("accuracy", "acc", "{:.3f}"), ("sec/image", "sec_per_image", "{:.4f}")])
    common.print_sweep("ldm", rows, rows[0]["n_samples"])
    return rows


@torch.no_grad()
def evaluate_ae(args, device):
    """--eval --recon: reconstruction PSNR and rFID (judge features; Inception with --fid-weights) of the
    autoencoder on --n-samples held-out images, with the posterior mean as z."""
    path = args.ae or args.ckpt or os.path.join(args.out, "ae.pt")
    ae, acfg, ck = common.load_ae(path)
    ae = ae.to(device)
    size, ch, n = acfg["image_size"], acfg["channels"], args.n_samples or 1000
    held = common.load_data(args.data, size, ch, train=False)
    x = torch.stack([held[i][0] for i in range(n if held.endless else min(n, len(held)))])
    bs = args.batch_size or 100
    rec = torch.cat([reconstruct(ae, x[i:i + bs].to(device), sample=False)[0].float().cpu()
                     for i in range(0, len(x), bs)])
    rec = common.quantize(rec)
    judge = common.get_judge(args.data, size, ch, device,
                             steps=PRESETS[args.preset].get("judge_steps", common.JUDGE_STEPS))
    res = {"script": "ldm", "mode": "recon", "f": acfg["f"], "z_ch": acfg["z_ch"], "n": len(x),
           "psnr": common.psnr(x, rec), "rfid": common.fid_kid(judge, rec, x)["fid"]}
    if args.fid_weights:
        inception = common.InceptionFID.load(args.fid_weights).to(device)
        res["rfid_inception"] = common.fid_kid(inception, rec, x)["fid"]
    print(f"autoencoder {path}: PSNR {res['psnr']:.2f} dB, rFID (judge) {res['rfid']:.4f} on {len(x)} "
          "held-out images")
    print(json.dumps(res))
    return res


#################################################################################
#                                  Command line                                 #
#################################################################################

def main(argv=None):
    p = common.make_parser("ldm", __doc__, PRESETS,
                           modes=[("--train-ae", "train only stage 1, the KL autoencoder (<out>/ae.pt)")],
                           weights="Stable Diffusion v1.x, a CompVis file (v1-5-pruned-emaonly.safetensors, "
                                   "sd-v1-4.ckpt) or a diffusers folder; --sample only, with --prompt")
    p.rule("--weights", goes_with="--sample --prompt")
    clip_tok = "CLIP's bpe_simple_vocab_16e6.txt.gz or a tokenizer/ folder (vocab.json, merges.txt)"
    p.add_argument("--tokenizer", metavar="PATH", goes_with="--weights", type=common.existing_path(clip_tok),
                   help=f"{clip_tok}; a diffusers folder needs none")
    p.add_argument("--cond", choices=["text", "class"], help="condition on captions (default) or labels")
    p.add_argument("--f", type=int, choices=[4, 8], help="the autoencoder's downsampling factor (default 4)")
    p.add_argument("--ae", metavar="PATH", help="the autoencoder checkpoint (default <out>/ae.pt)")
    p.add_argument("--ae-steps", type=common.nonneg_int, help="autoencoder training steps (default: preset)")
    p.add_argument("--prompt", goes_with="--sample", help="the caption to draw (text models)")
    p.add_argument("--class", dest="label", type=common.nonneg_int, goes_with="--sample", excludes="--prompt",
                   help="the class to draw (class models)")
    p.add_argument("--scale", type=common.nonneg_float, help=f"classifier-free guidance scale s (default "
                   f"{DEFAULT_SCALE:g}; 1: conditional, 0: unconditional)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"],
                   help=f"ddim (eta 0, {DEFAULT_STEPS} steps, default) or ddpm (ancestral, eta 1, T steps)")
    p.add_argument("--eta", type=common.unit_float, help="DDIM's eta in [0, 1] (overrides --sampler's)")
    p.add_argument("--sweep", action="store_true", goes_with="--eval", excludes="--scale",
                   help="every s in {1, 2, 3, 5, 7.5}")
    p.add_argument("--recon", action="store_true", goes_with="--eval", help="the autoencoder's PSNR, rFID")
    args = p.parse_args(argv)
    common.check_weights_flags(args)
    cfg = common.make_config(args, PRESETS, keys=("cond", "f", "ae_steps"))
    return common.run(args, lambda: train(args, cfg), sample_images, evaluate)


if __name__ == "__main__":
    common.main_guard(main)
