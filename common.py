"""
What the six paper scripts share, and only that: the networks several papers use, data, the training loop,
checkpoints, the command line, evaluation and the loading of released weights. The papers' own maths (losses,
samplers, guidance, GAN objectives) is NOT here: it lives in each script next to the equation it implements.
Copy a script together with this file and it runs.

Contents, in the order of the banner sections below:
    Errors                UserError (one line `error: ...`, exit status 2), Interrupted (Ctrl-C, 130)
    Noise schedules       beta_schedule, alphas_cumprod, on_device, extract
    The U-Net             timestep_embedding, ResBlock, Attention, AttnBlock, SpatialTransformer, UNet,
                          build_unet; DDPM_PRESETS (ddpm.py's and ddim.py's)
    Latent networks       AutoencoderKL, WordTokenizer, check_prompt, ClipTokenizer, TextEncoder, LDM,
                          load_ldm, load_ae
    Latent sampler        cfg_eps, guided_eps_fn, sample_latents, draw_latent (ldm.py, dreambooth.py)
    Data                  shapes, image folders, CIFAR-10, MNIST; load_data, held-out splits, batches
    Training plumbing     step_seed, devices and DDP, autocast, EMA, AdamW, checkpoints (atomic, safe)
    The training loop     start_training, restore, save_state, train_loop (every network's loop), train
    Images                grids and GIFs
    The command line      argparse types, Parser (flags with goes_with/excludes), make_parser, make_config,
                          claim_out, Progress, GracefulStop, run, main_guard
    Evaluation            the judge, FID, KID, precision/recall, accuracy, InceptionFID, evaluate
    Sweeps                sweep, table, cross_table: the --eval --sweep tables
    Released weights      safetensors and torch files, layouts, and the renamings of DDPM's (diffusers), ADM's
                          and Improved DDPM's (OpenAI) and Stable Diffusion's weights onto these networks
"""
import argparse
import copy
import functools
import gzip
import hashlib
import json
import math
import mmap
import os
import pickle
import re
import signal
import struct
import sys
import threading
import time
import types
import unicodedata
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm


#################################################################################
#                                     Errors                                    #
#################################################################################

class UserError(Exception):
    """Bad input from the user: printed as one line `error: ...` and exit status 2."""


class Interrupted(Exception):
    """Ctrl-C in a training loop, after the checkpoint of the current step was saved: exit status 130."""


#################################################################################
#                                Noise schedules                                #
#################################################################################
# Computed in float64, cast by the caller (on_device).

def beta_schedule(name, T, beta_start=1e-4, beta_end=0.02):
    """betas (T,) float64. linear: Ho et al. 2020 (1e-4 .. 0.02 for T=1000); cosine: Nichol &
    Dhariwal 2021 eq. 17 with s=0.008 and betas clipped at 0.999; sigmoid: a sigmoid ramp between
    the same endpoints as linear; scaled_linear: linspace(sqrt(start), sqrt(end))**2 as in LDM."""
    if name == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if name == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    if name == "cosine":
        f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
        i = np.arange(T, dtype=np.float64)
        return np.minimum(1 - f(i + 1) / f(i), 0.999)
    if name == "sigmoid":
        s = 1 / (1 + np.exp(-np.linspace(-6, 6, T, dtype=np.float64)))
        return beta_start + (beta_end - beta_start) * (s - s[0]) / (s[-1] - s[0])
    raise UserError(f"unknown beta schedule '{name}': use linear, cosine, sigmoid or scaled_linear")


def alphas_cumprod(cfg):
    """abar_t = prod_{s <= t} (1 - beta_s), t = 0..T-1, of a config's schedule, float64 on the CPU: samplers
    read Python floats from it, losses a float32 copy on the device (on_device)."""
    start, end = cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02)
    b = beta_schedule(cfg["schedule"], cfg["timesteps"], start, end)
    return torch.cumprod(1 - torch.as_tensor(b, dtype=torch.float64), 0)


def on_device(device):
    """The cast for a schedule computed in float64: a float32 copy on `device`, made once (MPS has no
    float64, and a copy per step would stall a GPU); device None keeps float64 on the CPU (the tests of
    the math). Cast on the CPU first, then moved: a float64 tensor never reaches the device."""
    return (lambda a: a) if device is None else (lambda a: a.float().to(device))


def extract(a, t, shape):
    """Gather a[t] for a batch of timesteps t (B,) and reshape to broadcast over x of `shape`. The
    schedule `a` must already live on t's device as float32 (the scripts compute schedules in float64
    and keep float32 copies on the network's device: MPS has no float64, and a copy per call would
    stall a GPU); float64 on the CPU is for the tests of the math."""
    return a[t].reshape(-1, *([1] * (len(shape) - 1)))


#################################################################################
#                      The U-Net (DDPM, ADM) and its blocks                     #
#################################################################################
# Ho et al. 2020 / Dhariwal & Nichol 2021, with the options later papers need.

def timestep_embedding(t, dim, max_period=10000, shift=0, cos_first=False):
    """Sinusoidal embedding (Transformer positional encoding) of timesteps t (B,) -> (B, dim): [sin, cos] of
    t * max_period^(-i / (half - shift)), i = 0..half-1. The released models differ in two details that change
    every output: DDPM's TensorFlow code divides by half - 1 (shift=1), OpenAI's code puts cos first."""
    half = dim // 2
    i = torch.arange(half, device=t.device, dtype=torch.float32)
    args = t.float()[:, None] * torch.exp(-math.log(max_period) * i / (half - shift))[None]
    pair = [torch.cos(args), torch.sin(args)] if cos_first else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(pair, dim=1)
    return F.pad(emb, (0, dim % 2))


def norm(ch, groups=None, eps=1e-5):
    """GroupNorm with 32 groups where the width allows it (fewer for narrow layers), or exactly `groups` (a
    released model's layers must be normalized over the groups it was trained with)."""
    g = groups or 32
    while not groups and g > 1 and (ch % g or ch // g < 4):
        g //= 2
    return nn.GroupNorm(g, ch, eps=eps)


def zero(module):
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class StyleNorm(nn.Module):
    """GroupNorm whose scale and shift come from a style vector s (B, style_dim), StyleGAN's AdaIN for
    groups: gamma(s) GN(h) + beta(s), with gamma starting at 1 and beta at 0. DDGAN's generator feeds its
    latent z (through a mapping network) to both norms of every residual block this way."""

    def __init__(self, ch, style_dim, groups=None, eps=1e-5):
        super().__init__()
        self.norm = norm(ch, groups, eps)
        self.norm.weight, self.norm.bias = None, None      # no affine of its own: the style gives it
        self.style = nn.Linear(style_dim, 2 * ch)
        nn.init.zeros_(self.style.bias)
        nn.init.ones_(self.style.bias[:ch])

    def forward(self, h, style):
        gamma, beta = self.style(style)[:, :, None, None].chunk(2, dim=1)
        return gamma * self.norm(h) + beta


class ResBlock(nn.Module):
    """GN -> SiLU -> (up/down) -> conv -> + time emb -> GN (AdaGN if scale_shift) -> SiLU ->
    dropout -> conv(zero init), plus a skip; optionally scaled by 1/sqrt(2) (skip_rescale). With
    style_dim both GNs are StyleNorms driven by a style vector (DDGAN's z) and the time emb is added."""

    def __init__(self, cin, cout, emb_dim, dropout=0.0, scale_shift=False, up=False, down=False,
                 skip_rescale=False, groups=None, eps=1e-5, style_dim=None):
        super().__init__()

        def gn(c):
            return StyleNorm(c, style_dim, groups, eps) if style_dim else norm(c, groups, eps)
        self.norm1, self.conv1 = gn(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout if scale_shift else cout)
        self.norm2, self.drop = gn(cout), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.scale_shift, self.up, self.down, self.skip_rescale = scale_shift, up, down, skip_rescale

    def resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.avg_pool2d(x, 2) if self.down else x

    def forward(self, x, emb, style=None):
        styled = (lambda n, h: n(h, style)) if style is not None else (lambda n, h: n(h))
        h = F.silu(styled(self.norm1, x))
        h, x = self.resample(h), self.resample(x)     # BigGAN-style: resample inside the block
        h = self.conv1(h)
        e = self.emb(F.silu(emb))[:, :, None, None]
        if self.scale_shift:                          # AdaGN: GN(h) * (1 + y_s) + y_b
            scale, shift = e.chunk(2, dim=1)
            h = styled(self.norm2, h) * (1 + scale) + shift
        else:
            h = styled(self.norm2, h + e)
        h = self.conv2(self.drop(F.silu(h)))
        out = self.skip(x) + h
        return out * (2 ** -0.5) if self.skip_rescale else out


class Attention(nn.Module):
    """Multi-head attention over a token sequence x (B, N, C); keys/values from x itself or from a context
    sequence (B, L, Dc) with an optional padding mask (B, L), True = real token; causal: token i sees tokens
    <= i only (CLIP's text encoder). bias: of the q and kv projections (default: self-attention only).
    zero_out: the output projection starts at zero, so a residual block around it starts as the identity."""

    def __init__(self, ch, heads, context_dim=None, bias=None, zero_out=True):
        super().__init__()
        self.heads = heads
        bias = context_dim is None if bias is None else bias
        self.q = nn.Linear(ch, ch, bias=bias)
        self.kv = nn.Linear(context_dim or ch, 2 * ch, bias=bias)
        self.out = zero(nn.Linear(ch, ch)) if zero_out else nn.Linear(ch, ch)

    def forward(self, x, context=None, mask=None, causal=False):
        B, N, C = x.shape
        ctx = x if context is None else context
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)                  # (B, h, N, d)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        m = None if mask is None else mask[:, None, None, :]                      # (B, 1, 1, L)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)
        return self.out(h.transpose(1, 2).reshape(B, N, C))


class AttnBlock(nn.Module):
    """Self-attention at one resolution (DDPM/ADM; the mid blocks of LDM's autoencoder): x + Attn(GN x)."""

    def __init__(self, ch, heads, skip_rescale=False, groups=None, eps=1e-5):
        super().__init__()
        self.norm = norm(ch, groups, eps)
        self.attn = Attention(ch, heads)
        self.skip_rescale = skip_rescale

    def forward(self, x, context=None, mask=None):
        B, C, H, W = x.shape
        h = self.attn(self.norm(x).flatten(2).transpose(1, 2))        # (B, HW, C)
        out = x + h.transpose(1, 2).reshape(B, C, H, W)
        return out * (2 ** -0.5) if self.skip_rescale else out


class GEGLU(nn.Module):
    """The gated feed-forward input of LDM's transformer (Shazeer 2020): x W, gate -> x W * GELU(gate)."""

    def __init__(self, d, inner):
        super().__init__()
        self.proj = nn.Linear(d, 2 * inner)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class SpatialTransformer(nn.Module):
    """LDM's cross-attention block (Rombach et al. 2022, Sec. 3.3 and Appendix, the U-Net's attention layers):
    h = proj_in(GN x) as tokens (B, HW, C); h += SelfAttn(LN h); h += CrossAttn(LN h, context); h +=
    FF(LN h) with a GEGLU feed-forward of width 4C; x + proj_out(h). proj_out starts at zero, as in Stable
    Diffusion's released code, so that the block starts as the identity and the U-Net around it is
    unchanged at initialization. GroupNorm eps 1e-6 and bias-free self-attention q, k, v as released.
    context (B, L, Dc) with an optional padding mask (B, L)."""

    def __init__(self, ch, heads, context_dim, groups=None):
        super().__init__()
        self.norm = norm(ch, groups, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.norm1, self.attn1 = nn.LayerNorm(ch), Attention(ch, heads, bias=False, zero_out=False)
        self.norm2, self.attn2 = nn.LayerNorm(ch), Attention(ch, heads, context_dim, zero_out=False)
        self.norm3, self.ff = nn.LayerNorm(ch), nn.Sequential(GEGLU(ch, 4 * ch), nn.Linear(4 * ch, ch))
        self.proj_out = zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x, context, mask=None):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)        # (B, HW, C)
        h = h + self.attn1(self.norm1(h))
        h = h + self.attn2(self.norm2(h), context, mask)
        h = h + self.ff(self.norm3(h))
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv. tf_pad: pad only right and bottom, as TensorFlow's 'SAME' padding does for an even
    input (DDPM's released CIFAR-10 and LSUN models were trained in TensorFlow); else one pixel all round."""

    def __init__(self, ch, tf_pad=False):
        super().__init__()
        self.tf_pad = tf_pad
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if tf_pad else 1)

    def forward(self, x, emb=None):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.tf_pad else x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020, Appendix B) with ADM's options (Dhariwal & Nichol 2021).

    ch, ch_mult, num_res_blocks, attn_res (resolutions in pixels with attention), heads (or
    head_channels: channels per head, ADM uses 64), dropout, in_ch, out_ch (2*in_ch for learned
    variances), image_size. Options: num_classes (class embedding with a null label at index
    num_classes; null_label=False: none, as in ADM's released models), context_dim (cross-attention to a
    context sequence), scale_shift (AdaGN), resblock_updown (BigGAN up/down residual blocks), skip_rescale
    (1/sqrt(2) residuals). For an exact match with released weights (all off by default): norm_groups
    (exactly this many GroupNorm groups everywhere), norm_eps, emb_shift and emb_cos_first (see
    timestep_embedding), tf_pad (see Downsample). style_dim: every residual block's two norms are
    StyleNorms of a style vector, forward(..., style=(B, style_dim)) (DDGAN's z after its mapping network).
    forward(x, t, y=None, context=None, mask=None, style=None)."""

    def __init__(self, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(16,), heads=4,
                 head_channels=None, dropout=0.0, in_ch=3, out_ch=3, image_size=32,
                 num_classes=None, context_dim=None, scale_shift=False, resblock_updown=False,
                 skip_rescale=False, null_label=True, norm_groups=None, norm_eps=1e-5, emb_shift=0,
                 emb_cos_first=False, tf_pad=False, style_dim=None):
        super().__init__()
        emb_dim = 4 * ch
        self.ch, self.num_classes, self.null_label = ch, num_classes, null_label
        self.emb_shift, self.emb_cos_first = emb_shift, emb_cos_first
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + null_label, emb_dim) if num_classes else None
        gn = dict(groups=norm_groups, eps=norm_eps)
        res_kw = dict(emb_dim=emb_dim, dropout=dropout, scale_shift=scale_shift, skip_rescale=skip_rescale,
                      style_dim=style_dim, **gn)

        def attn(c):
            h = c // head_channels if head_channels else heads
            if context_dim:
                return SpatialTransformer(c, h, context_dim, norm_groups)
            return AttnBlock(c, h, skip_rescale, **gn)

        def down(c):
            return ResBlock(c, c, down=True, **res_kw) if resblock_updown else Downsample(c, tf_pad)

        def up(c):
            return ResBlock(c, c, up=True, **res_kw) if resblock_updown else Upsample(c)

        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, skips, c, res = nn.ModuleList(), [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(c, ch * mult, **res_kw)]
                c = ch * mult
                if res in attn_res:
                    blocks.append(attn(c))
                self.down.append(nn.ModuleList(blocks))
                skips.append(c)
            if level != len(ch_mult) - 1:
                self.down.append(nn.ModuleList([down(c)]))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, **res_kw), attn(c), ResBlock(c, c, **res_kw)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for i in range(num_res_blocks + 1):
                blocks = [ResBlock(c + skips.pop(), ch * mult, **res_kw)]
                c = ch * mult
                if res in attn_res:
                    blocks.append(attn(c))
                if level and i == num_res_blocks:
                    blocks.append(up(c))
                    res *= 2
                self.up.append(nn.ModuleList(blocks))
        self.out = nn.Sequential(norm(c, **gn), nn.SiLU(), zero(nn.Conv2d(c, out_ch, 3, padding=1)))

    def run(self, blocks, h, emb, context, mask, style):
        for b in blocks:
            if isinstance(b, (AttnBlock, SpatialTransformer)):
                h = b(h, context, mask)
            elif isinstance(b, ResBlock):
                h = b(h, emb, style)
            else:
                h = b(h)
        return h

    def forward(self, x, t, y=None, context=None, mask=None, style=None):
        e = self.time_mlp(timestep_embedding(t, self.ch, shift=self.emb_shift, cos_first=self.emb_cos_first))
        if self.class_emb is not None:  # y=None or y=num_classes: the null label
            if y is None and not self.null_label:
                raise ValueError("this class-conditional U-Net has no null label: give the class labels y")
            y = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y
            e = e + self.class_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = self.run(blocks, h, e, context, mask, style)
            hs.append(h)
        h = self.run(self.mid, h, e, context, mask, style)
        for blocks in self.up:
            h = self.run(blocks, torch.cat([h, hs.pop()], dim=1), e, context, mask, style)
        return self.out(h)


UNET_OPTIONS = ("heads", "head_channels", "dropout", "num_classes", "context_dim", "scale_shift",
                "resblock_updown", "skip_rescale", "null_label", "norm_groups", "norm_eps", "emb_shift",
                "emb_cos_first", "tf_pad", "style_dim")


def build_unet(cfg):
    """A UNet from a plain config dict (the keys of the scripts' presets); options it does not name keep
    their defaults, so older checkpoints build the network they were trained with."""
    return UNet(ch=cfg["ch"], ch_mult=cfg["ch_mult"], num_res_blocks=cfg["num_res_blocks"],
                attn_res=cfg["attn_res"], in_ch=cfg["channels"], out_ch=cfg.get("out_ch", cfg["channels"]),
                image_size=cfg["image_size"], **{k: cfg[k] for k in UNET_OPTIONS if cfg.get(k) is not None})


def resize_unet(cfg, size):
    """The same network's config for size x size images: attention stays at the same levels of the U-Net."""
    levels = [round(math.log2(cfg["image_size"] / r)) for r in cfg["attn_res"]]
    return {**cfg, "image_size": size, "attn_res": [size >> level for level in levels]}


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# The presets of ddpm.py and of ddim.py, which trains DDPM's network with DDPM's objective, so that either
# script's checkpoint builds the same network and each samples the other's.
DDPM_PRESETS = {
    # seconds, for tests
    "tiny": dict(image_size=16, channels=3, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_res=[8], heads=2,
                 dropout=0.0, timesteps=100, schedule="linear", objective="eps", var="large",
                 batch_size=8, max_steps=20, lr=1e-3, warmup=0, grad_clip=1.0, ema=0.99,
                 log_every=5, sample_every=0, ckpt_every=10, judge_steps=30),
    # the default: minutes on a 2-core CPU
    "cpu": dict(image_size=32, channels=3, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_res=[8], heads=4,
                dropout=0.0, timesteps=1000, schedule="linear", objective="eps", var="large",
                batch_size=32, max_steps=2400, lr=2e-3, warmup=200, grad_clip=1.0, ema=0.995,
                log_every=25, sample_every=1200, ckpt_every=500),
    # Ho et al. 2020, CIFAR-10 (Appendix B): 35.7M parameters, lr 2e-4, batch 128, 800K steps
    "paper": dict(image_size=32, channels=3, ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_res=[16],
                  heads=1, dropout=0.1, timesteps=1000, schedule="linear", objective="eps", var="large",
                  batch_size=128, max_steps=800_000, lr=2e-4, warmup=5000, grad_clip=1.0, ema=0.9999,
                  flip=True, log_every=100, sample_every=10_000, ckpt_every=5000),
}


#################################################################################
#              Latent diffusion's networks (LDM, Stable Diffusion)              #
#################################################################################
# Rombach et al. 2022, shared by ldm.py and dreambooth.py: the KL autoencoder, the text encoders and their
# tokenizers, and the model that holds a U-Net and its conditioning encoder. The paper's own maths (the
# autoencoder's loss, latent scaling, the conditioning and its loss) stays in ldm.py.

def ae_levels(acfg):
    """The channel multipliers of the autoencoder's resolution levels: log2(f) downsamplings."""
    f = acfg["f"]
    if f not in (4, 8):
        raise UserError(f"--f {f}: use 4 or 8")
    return acfg["ae_mult"][:int(math.log2(f)) + 1]


def gaussian_moments(moments):
    """The encoder's 2 z_ch output channels -> (mean, log-variance) of q(z | x), the log-variance clamped to
    [-30, 20] as the released autoencoder does (keeps e^logvar finite in both directions)."""
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


class AEResBlock(nn.Module):
    """GN -> SiLU -> conv -> GN -> SiLU -> conv, plus a (1x1) skip; no time embedding. GroupNorm eps 1e-6."""

    def __init__(self, cin, cout, groups=None):
        super().__init__()
        self.norm1, self.conv1 = norm(cin, groups, 1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout, groups, 1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


def ae_mid(c, groups):
    """The middle of the encoder and of the decoder: residual block, single-head self-attention over all
    positions (the only attention of the released kl-f8 autoencoder), residual block."""
    return nn.ModuleList([AEResBlock(c, c, groups), AttnBlock(c, 1, groups=groups, eps=1e-6),
                          AEResBlock(c, c, groups)])


def ae_level(blocks, resample):
    """One resolution level: its residual blocks, then the down- or upsampling (Identity where none)."""
    level = nn.Module()
    level.block, level.resample = nn.ModuleList(blocks), resample
    return level


class Encoder(nn.Module):
    """x -> conv_in -> per level: nb residual blocks, then a stride-2 conv (padded right and bottom, as
    released) -> mid block -> GN, SiLU, conv_out to out_ch channels (2 z_ch: the moments of q(z | x))."""

    def __init__(self, channels, ch, mult, nb, out_ch, groups=None):
        super().__init__()
        self.conv_in, c = nn.Conv2d(channels, ch, 3, padding=1), ch
        self.down = nn.ModuleList()
        for i, m in enumerate(mult):
            blocks = [AEResBlock(c if j == 0 else ch * m, ch * m, groups) for j in range(nb)]
            c = ch * m
            down = Downsample(c, tf_pad=True) if i < len(mult) - 1 else nn.Identity()
            self.down.append(ae_level(blocks, down))
        self.mid = ae_mid(c, groups)
        self.norm_out, self.conv_out = norm(c, groups, 1e-6), nn.Conv2d(c, out_ch, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for b in level.block:
                h = b(h)
            h = level.resample(h)
        for b in self.mid:
            h = b(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z -> conv_in -> mid block -> per level, lowest resolution first: nb + 1 residual blocks, then a
    nearest x2 upsampling and conv -> GN, SiLU, conv_out. up[i] is level i (0 = full size), as released."""

    def __init__(self, z_ch, ch, mult, nb, out_ch, groups=None):
        super().__init__()
        c = ch * mult[-1]
        self.conv_in, self.mid = nn.Conv2d(z_ch, c, 3, padding=1), ae_mid(c, groups)
        levels = []
        for i, m in reversed(list(enumerate(mult))):
            blocks = [AEResBlock(c if j == 0 else ch * m, ch * m, groups) for j in range(nb + 1)]
            c = ch * m
            levels.append(ae_level(blocks, Upsample(c) if i > 0 else nn.Identity()))
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out, self.conv_out = norm(c, groups, 1e-6), nn.Conv2d(c, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for b in self.mid:
            h = b(h)
        for level in reversed(self.up):
            for b in level.block:
                h = b(h)
            h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """LDM's perceptual compression model (Sec. 3.1): x (H, W, C) -> E -> q(z | x) = N(mean, e^logvar) with z
    (H/f, W/f, z_ch) -> D -> x~; quant_conv / post_quant_conv are the 1x1 convs on either side of the latent.
    The architecture of the released kl-f4/kl-f8 autoencoders; acfg: channels, ae_ch, ae_mult, ae_res_blocks,
    z_ch, f, and ae_groups (GroupNorm groups: None picks fewer for narrow layers; released: 32). The attention
    output projection starts at zero (DDPM's init; the released one is default-initialized: only training
    from scratch sees the difference)."""

    def __init__(self, acfg):
        super().__init__()
        ch, mult, nb, z = acfg["ae_ch"], ae_levels(acfg), acfg["ae_res_blocks"], acfg["z_ch"]
        groups = acfg.get("ae_groups")
        self.encoder = Encoder(acfg["channels"], ch, mult, nb, 2 * z, groups)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.decoder = Decoder(z, ch, mult, nb, acfg["channels"], groups)

    def encode(self, x):
        """x -> (mean, log-variance) of q(z | x)."""
        return gaussian_moments(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


class WordTokenizer:
    """ldm.py's own tokenizer, word-level: lower-cased runs of letters and digits. Ids 0 <pad>, 1 <bos>
    (always first, so the empty caption is one real token), 2 <unk> (every word not in the vocabulary), then
    the vocabulary in the order given (build() sorts it; words appended later, e.g. DreamBooth's identifier,
    keep every earlier id valid). Sequences are padded (or cut) to max_len."""
    SPECIALS = ["<pad>", "<bos>", "<unk>"]
    PAD, BOS, UNK = 0, 1, 2

    def __init__(self, vocab, max_len):
        words = [w for w in vocab if w not in self.SPECIALS]
        self.vocab = self.SPECIALS + list(dict.fromkeys(words))
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len

    @staticmethod
    def words(text):
        return re.findall(r"[a-z0-9]+", text.lower())

    @classmethod
    def build(cls, captions, max_len):
        return cls(sorted({w for c in captions for w in cls.words(c)}), max_len)

    def encode(self, text):
        return [self.BOS] + [self.index.get(w, self.UNK) for w in self.words(text)][:self.max_len - 1]

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids if i not in (self.PAD, self.BOS))

    def unknown(self, text):
        return [w for w in self.words(text) if w not in self.index]

    def __call__(self, texts):
        """A batch of captions -> token ids (B, max_len), 0-padded."""
        out = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.encode(t)
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def check_prompt(tok, prompt):
    """--prompt against a tokenizer: an error when it holds no word the model knows, a warning for the words
    that become <unk> (CLIP's tokenizer spells every word)."""
    unknown = tok.unknown(prompt)
    if unknown and len(unknown) == len(WordTokenizer.words(prompt)):
        raise UserError(f"--prompt '{prompt}': no word the model knows; its vocabulary: "
                        f"{', '.join(tok.vocab[3:])}")
    if unknown:
        warn(f"unknown word(s) {', '.join(unknown)} in --prompt become <unk>")


def byte_alphabet():
    """Byte-level BPE's 256 symbols (GPT-2, Radford et al. 2019, Sec. 2.2; CLIP): the printable bytes
    ! .. ~, ¡ .. ¬ and ® .. ÿ stand for themselves, every other byte b for chr(256 + k), k counting those
    bytes in order. No symbol is a space or a control character, so a merges file can name them."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(rest)}}


def char_kind(c):
    """What CLIP's pre-tokenizer groups by: 'L' letters, 'N' numbers, ' ' white space, '?' anything else."""
    if c.isspace():
        return " "
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "?"


CLIP_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def clip_pieces(text):
    """CLIP's pre-tokenization, the regular expression of its released tokenizer spelled out with the standard
    library (re has no Unicode classes): the special tokens, the contractions 's 't 're 've 'm 'll 'd, runs of
    letters, single numbers, and runs of other non-space characters, tried in that order at each position."""
    pieces, i = [], 0
    while i < len(text):
        word = next((w for w in (ClipTokenizer.BOS_TEXT, ClipTokenizer.EOS_TEXT) + CLIP_CONTRACTIONS
                     if text.startswith(w, i)), None)
        kind = char_kind(text[i])
        if word is None and kind == " ":
            i += 1
            continue
        if word is None:
            j = i + 1
            while kind != "N" and j < len(text) and char_kind(text[j]) == kind:
                j += 1
            word = text[i:j]
        pieces.append(word)
        i += len(word)
    return pieces


class ClipTokenizer:
    """CLIP's byte-level BPE tokenizer (Radford et al. 2021, Sec. 2.4; Sennrich et al. 2016), the one Stable
    Diffusion's text encoder reads: text -> NFC, white space collapsed, lower case -> pieces (clip_pieces) ->
    UTF-8 bytes as byte_alphabet symbols, '</w>' on the last -> merges applied lowest rank first -> ids.
    A prompt becomes [<|startoftext|>] + at most max_len - 2 ids + [<|endoftext|>], padded with pad_id
    (<|endoftext|> for SD v1) to max_len = 77."""
    BOS_TEXT, EOS_TEXT = "<|startoftext|>", "<|endoftext|>"
    VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"

    def __init__(self, merges, vocab=None, max_len=77, pad=None):
        symbols = list(byte_alphabet().values())
        if vocab is None:   # CLIP's order: the symbols, each with '</w>', the merges, the two special tokens
            vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
            vocab = {t: i for i, t in enumerate(vocab + [self.BOS_TEXT, self.EOS_TEXT])}
        self.index, self.byte_symbol = vocab, byte_alphabet()
        self.rank = {tuple(m): i for i, m in enumerate(merges)}
        self.bos, self.eos = vocab[self.BOS_TEXT], vocab[self.EOS_TEXT]
        self.pad = vocab.get(pad, self.eos)
        self.max_len, self.cache = max_len, {}

    @classmethod
    def load(cls, path, flag="--tokenizer"):
        """bpe_simple_vocab_16e6.txt.gz (CLIP's: a header line, then merges; CLIP uses the first
        49152 - 256 - 2 of them), or a tokenizer/ folder (vocab.json + merges.txt; a diffusers pipeline
        folder holds one)."""
        folder = os.path.join(path, "tokenizer") if os.path.isdir(os.path.join(path, "tokenizer")) else path
        try:
            if os.path.isdir(folder):
                with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
                    vocab = json.load(f)
                with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
                    lines = [m for m in f.read().split("\n") if m and not m.startswith("#version")]
                pad = None
                config = os.path.join(folder, "tokenizer_config.json")
                if os.path.isfile(config):
                    with open(config, encoding="utf-8") as f:
                        pad = json.load(f).get("pad_token")
                pad = pad.get("content") if isinstance(pad, dict) else pad
                return cls([tuple(m.split()) for m in lines], vocab, pad=pad)
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = [m for m in f.read().split("\n")[1:49152 - 256 - 2 + 1] if m]
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{flag} {path}: not CLIP's {cls.VOCAB_FILE} nor a tokenizer/ folder with "
                            f"vocab.json and merges.txt ({e.__class__.__name__}: {e})")
        return cls([tuple(m.split()) for m in lines])

    def bpe(self, piece):
        """One piece -> its BPE tokens: from single byte symbols, merge the adjacent pair of lowest rank
        everywhere it occurs, until no adjacent pair is a merge."""
        if piece in self.cache:
            return self.cache[piece]
        symbols = [self.byte_symbol[b] for b in piece.encode("utf-8")]
        word = symbols[:-1] + [symbols[-1] + "</w>"]
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: self.rank.get(p, math.inf))
            if pair not in self.rank:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[piece] = word
        return word

    def encode(self, text):
        """Text -> ids, without the start and end tokens; a token missing from the vocabulary becomes
        <|endoftext|>, CLIP's unknown token."""
        text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
        ids = []
        for piece in clip_pieces(text):
            tokens = [piece] if piece in (self.BOS_TEXT, self.EOS_TEXT) else self.bpe(piece)
            ids += [self.index.get(t, self.eos) for t in tokens]
        return ids

    def unknown(self, text):
        return []   # every byte has a token

    def __call__(self, texts):
        out = torch.full((len(texts), self.max_len), self.pad, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.bos] + self.encode(t)[:self.max_len - 2] + [self.eos]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


class QuickGELU(nn.Module):
    """CLIP's activation: x sigmoid(1.702 x), a fast approximation of GELU that the released weights need."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class TextBlock(nn.Module):
    """Pre-LN transformer block: x += SelfAttn(LN x); x += FF(LN x), FF of width 4d."""

    def __init__(self, d, heads, quick_gelu=False):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), QuickGELU() if quick_gelu else nn.GELU(),
                                nn.Linear(4 * d, d))

    def forward(self, x, mask=None, causal=False):
        x = x + self.attn(self.ln1(x), mask=mask, causal=causal)
        return x + self.ff(self.ln2(x))


class TextEncoder(nn.Module):
    """tau_theta for text: token + learned position embeddings, transformer blocks, a final LayerNorm; tokens
    (B, L) -> (context (B, L, d), mask). ldm.py's own (clip=False): attention over the real tokens only, mask
    (B, L) True = real token. clip=True: CLIP's text transformer as Stable Diffusion uses it (Radford et al.
    2021): causal attention, QuickGELU, no padding mask (mask None): all max_len states are the context."""

    def __init__(self, vocab_size, d, layers, heads, max_len, clip=False):
        super().__init__()
        self.clip = clip
        self.tok = nn.Embedding(vocab_size, d)
        self.pos = nn.Parameter(torch.randn(max_len, d) * 0.02)
        self.blocks = nn.ModuleList([TextBlock(d, heads, quick_gelu=clip) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)

    def forward(self, tokens):
        mask = None if self.clip else tokens != WordTokenizer.PAD
        x = self.tok(tokens) + self.pos[:tokens.shape[1]]
        for b in self.blocks:
            x = b(x, mask, causal=self.clip)
        return self.ln(x), mask


class LDM(nn.Module):
    """A latent diffusion model's trained networks in one module (so that one optimizer, EMA and checkpoint
    cover both): the latent U-Net, common.UNet with SpatialTransformer blocks, and tau_theta, the text encoder
    (cfg cond 'text'; text 'clip' for Stable Diffusion's) or a class embedding with the null class at index
    num_classes (cond 'class'). forward(z_t, t, c) with c token ids (B, L) or labels (B,)."""

    def __init__(self, cfg):
        super().__init__()
        self.cond, d = cfg["cond"], cfg["context_dim"]
        self.unet = UNet(ch=cfg["ch"], ch_mult=cfg["ch_mult"], num_res_blocks=cfg["num_res_blocks"],
                         attn_res=cfg["attn_res"], heads=cfg["heads"], dropout=cfg.get("dropout", 0.0),
                         in_ch=cfg["z_ch"], out_ch=cfg["z_ch"], image_size=cfg["image_size"] // cfg["f"],
                         context_dim=d, norm_groups=cfg.get("norm_groups"),
                         emb_cos_first=cfg.get("emb_cos_first", False))
        if self.cond == "text":
            self.text = TextEncoder(cfg["vocab_size"] if "vocab_size" in cfg else len(cfg["vocab"]), d,
                                    cfg["text_layers"], cfg["text_heads"], cfg["max_len"],
                                    clip=cfg.get("text") == "clip")
        else:
            self.num_classes = cfg["num_classes"]
            self.class_emb = nn.Embedding(cfg["num_classes"] + 1, d)

    def context(self, c):
        """tau_theta(y) -> (context (B, L, D), mask (B, L) or None)."""
        if self.cond == "text":
            return self.text(c)
        return self.class_emb(c)[:, None], None

    def forward(self, z, t, c):
        ctx, mask = self.context(c)
        return self.unet(z, t, context=ctx, mask=mask)


def load_ldm(path, scripts=("ldm",)):
    """An ldm.py checkpoint (its EMA weights; or a fine-tuned one of dreambooth.py, with 'dreambooth' in
    scripts) -> (LDM, AutoencoderKL, config, checkpoint), both networks frozen in eval mode."""
    ck = load_checkpoint(path, list(scripts))
    if ck["script"] == "ldm" and ck.get("kind") != "ldm":
        raise UserError(f"{path} is ldm.py's {ck.get('kind', 'unknown')} checkpoint, not the latent "
                        "diffusion model; pass <ldm out>/ckpt.pt")
    if "ae" not in ck:
        raise UserError(f"{path} holds no autoencoder; retrain with `python ldm.py --train`")
    model = load_state(LDM(ck["config"]), ck["ema"] if ck["script"] == "ldm" else ck["model"], path)
    ae = load_state(AutoencoderKL(ck["ae_config"]), ck["ae"], path)
    return model.eval().requires_grad_(False), ae.eval().requires_grad_(False), ck["config"], ck


def load_ae(path):
    """ldm.py's autoencoder from its ae.pt or from an LDM checkpoint (which carries its own copy) -> (frozen
    AutoencoderKL in eval mode, its config, the checkpoint)."""
    if not os.path.exists(path):
        raise UserError(f"autoencoder {path} not found; train it with `python ldm.py --train-ae` "
                        "(or --train, which trains it first)")
    ck = load_checkpoint(path, ["ldm"])
    if ck.get("kind") == "ldm":
        acfg, state = ck["ae_config"], ck["ae"]
    elif ck.get("kind") == "autoencoder":
        acfg, state = ck["config"], ck["model"]
    else:
        raise UserError(f"{path} is not an ldm.py autoencoder checkpoint")
    ae = load_state(AutoencoderKL(acfg), state, path)
    return ae.eval().requires_grad_(False), acfg, ck


#################################################################################
#         Latent diffusion's sampler: DDIM with classifier-free guidance        #
#################################################################################
# How ldm.py and dreambooth.py draw, as Stable Diffusion's release does: classifier-free guidance (Ho &
# Salimans 2022, eq. 6) against the null condition, and the DDIM step (Song et al. 2021, eq. 12; ddim.py) on
# latents.

def cfg_eps(eps_cond, eps_uncond, s):
    """Classifier-free guidance: eps~ = eps(z, empty) + s (eps(z, c) - eps(z, empty)); s = 1: the
    conditional model, s = 0: the unconditional one, s > 1: guided (s = 1 + w of Ho & Salimans)."""
    return eps_uncond + s * (eps_cond - eps_uncond)


def guided_eps_fn(model, c, c_null, s):
    """eps_fn(z, t) for an int t with guidance scale s, for an LDM: the context is encoded once, and the
    conditional and unconditional predictions come from one batched U-Net call (one evaluation when s is
    0 or 1)."""
    ctx, mask = model.context(c)
    nctx, nmask = model.context(c_null)
    both_mask = None if mask is None else torch.cat([mask, nmask])

    def eps_fn(z, t):
        tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        if s == 1:
            return model.unet(z, tt, context=ctx, mask=mask).float()
        if s == 0:
            return model.unet(z, tt, context=nctx, mask=nmask).float()
        e = model.unet(torch.cat([z, z]), torch.cat([tt, tt]), context=torch.cat([ctx, nctx]), mask=both_mask)
        e_c, e_u = e.float().chunk(2)
        return cfg_eps(e_c, e_u, s)
    return eps_fn


def ddim_latent_step(z, eps, a, a_prev, eta=0.0):
    """DDIM (Song et al. eq. 12) with sigma(eta) of eq. 16; eta = 1 is DDPM's ancestral step with the
    posterior variance. z0_hat is not clipped: latents are not bounded like pixels."""
    z0 = (z - (1 - a) ** 0.5 * eps) / a ** 0.5
    sigma = eta * ((1 - a_prev) / (1 - a)) ** 0.5 * (1 - a / a_prev) ** 0.5
    z = a_prev ** 0.5 * z0 + max(0.0, 1 - a_prev - sigma ** 2) ** 0.5 * eps
    return z + sigma * torch.randn_like(z) if sigma > 0 else z


@torch.no_grad()
def sample_latents(eps_fn, z, abar, steps, eta=0.0, progress=False, offset=0):
    """From z_T over the timesteps i T / S + offset, i = S-1 .. 0, abar as Python floats. offset 0 (ours): the
    last step ends at abar = 1 (not abar_0), so that it returns the predicted z_0 itself (DDIM eq. 12 with
    alpha_0 = 1). offset 1: Stable Diffusion's released sampler, whose last step ends at abar_0."""
    T = len(abar)
    if not 1 <= steps <= T:
        raise UserError(f"--steps {steps}: use 1..{T}, the model's number of timesteps T")
    ts = [min(i * T // steps + offset, T - 1) for i in range(steps)]
    for i in steps_bar(reversed(range(steps)), steps, "sampling", progress):
        prev = ts[i - 1] if i > 0 else ts[0] - 1           # below the first timestep: abar_0, or 1 at t = -1
        a_prev = float(abar[prev]) if prev >= 0 else 1.0
        z = ddim_latent_step(z, eps_fn(z, ts[i]), float(abar[ts[i]]), a_prev, eta)
    return z


@torch.no_grad()
def draw_latent(model, ae, cfg, c, c_null, scale, steps, eta=0.0, progress=False, abar=None):
    """Images (n, C, H, W) in [-1, 1] from an LDM and its autoencoder for conditions c (n, ...): z_T ~ N(0,
    I), guided DDIM in latent space (sample_latents with the config's ddim_offset), then D(z / scale_factor).
    abar: the config's schedule as Python floats, where the caller has it already."""
    r = cfg["image_size"] // cfg["f"]
    eps_fn = guided_eps_fn(model, c, c_null, scale)
    z = torch.randn(c.shape[0], cfg["z_ch"], r, r, device=c.device)
    abar = abar or alphas_cumprod(cfg).tolist()
    z = sample_latents(eps_fn, z, abar, steps, eta, progress, cfg.get("ddim_offset", 0))
    return ae.decode(z / cfg["scale_factor"]).float().clamp(-1, 1)


#################################################################################
#                                      Data                                     #
#################################################################################
# Every dataset yields (image in [-1, 1] as (C, H, W) float, label int, caption str).

SHAPES = ["circle", "square", "triangle", "cross"]
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235),
          "yellow": (235, 210, 40), "purple": (150, 60, 210), "white": (240, 240, 240)}
SIZES = ["small", "large"]
POSITIONS = ["left", "center", "right"]
POSITION_WORDS = {"left": "on the left", "center": "in the center", "right": "on the right"}
BACKGROUND = (24, 24, 32)


def shape_caption(a):
    """'a small red circle on the left' from an attribute dict."""
    return f"a {a['size']} {a['color']} {a['shape']} {POSITION_WORDS[a['position']]}"


def draw_shape(a, image_size=32, channels=3, jitter=(0.0, 0.0, 1.0), supersample=4):
    """Render one shape with attributes `a` (shape, color, size, position) on a plain background.
    jitter = (dx, dy, scale) in fractions of the image. Drawn at 4x and box-filtered (antialiased).
    With a['subject'] true, the circle is DreamBooth's "subject": a ring (a hole of 0.55 r in the middle)."""
    S = image_size * supersample
    img = Image.new("RGB", (S, S), BACKGROUND)
    d = ImageDraw.Draw(img)
    cx = S * ({"left": 0.25, "center": 0.5, "right": 0.75}[a["position"]] + jitter[0])
    cy = S * (0.5 + jitter[1])
    r = S * (0.11 if a["size"] == "small" else 0.2) * jitter[2]
    col = COLORS[a["color"]]
    if a["shape"] == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        if a.get("subject"):
            # a distinctive instance the ordinary data never draws (coarse enough that ldm.py's f = 4
            # autoencoder, trained on plain shapes, keeps it; thin stripes it erased)
            h = 0.55 * r
            d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=BACKGROUND)
    elif a["shape"] == "square":
        q = r * 0.88
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=col)
    elif a["shape"] == "triangle":
        d.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=col)
    elif a["shape"] == "cross":
        w = r * 0.36
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
    img = img.resize((image_size, image_size), Image.BOX)
    return img.convert("L") if channels == 1 else img


def to_tensor(img):
    """PIL image -> (C, H, W) float in [-1, 1]."""
    a = np.asarray(img, dtype=np.float32)
    a = a[:, :, None] if a.ndim == 2 else a
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1


class ShapesData:
    """Endless, deterministic colored shapes: item i is drawn from numpy's RNG seeded by (seed, i).
    Label = shape index; caption like 'a small red circle on the left'. No download."""
    endless = True

    def __init__(self, image_size=32, channels=3, seed=0, subject=False):
        self.image_size, self.channels, self.seed, self.subject = image_size, channels, seed, subject
        self.class_names = list(SHAPES)
        self.num_classes = len(SHAPES)

    def attributes(self, i):
        rng = np.random.default_rng([self.seed, i])
        a = {"shape": SHAPES[rng.integers(4)], "color": list(COLORS)[rng.integers(len(COLORS))],
             "size": SIZES[rng.integers(2)], "position": POSITIONS[rng.integers(3)]}
        if self.subject:
            a["shape"], a["subject"] = "circle", True
        a["jitter"] = (rng.uniform(-0.04, 0.04), rng.uniform(-0.1, 0.1), rng.uniform(0.9, 1.1))
        return a

    def __getitem__(self, i):
        a = self.attributes(i)
        img = draw_shape(a, self.image_size, self.channels, a["jitter"])
        return to_tensor(img), SHAPES.index(a["shape"]), shape_caption(a)

    def label(self, i):
        return SHAPES.index(self.attributes(i)["shape"])  # without drawing


class TensorData:
    """Images held in memory as uint8 (N, C, H, W) with labels; folders, CIFAR-10 and MNIST load to this."""
    endless = False

    def __init__(self, images, labels, class_names, captions=None):
        self.images, self.labels, self.class_names, self.captions = images, labels, class_names, captions
        self.num_classes = len(class_names) if class_names else None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        cap = ""
        if self.captions:
            cap = self.captions[i]
        elif self.class_names:
            cap = self.class_names[self.labels[i]]
        return self.images[i].float() / 127.5 - 1, int(self.labels[i]), cap

    def label(self, i):
        return int(self.labels[i])

    def subset(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TensorData(self.images[idx], self.labels[idx], self.class_names,
                          [self.captions[i] for i in idx.tolist()] if self.captions else None)


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_SIDE = 8                    # smaller images are refused rather than upscaled
HELD_OUT = 0.2                  # data with no test split of its own keeps this fraction of each class ...
HELD_OUT_MAX = 2000             # ... and at most this many images in all
HELD_OUT_SEED = 10_000_019      # shapes' held-out part: the images of seed + this, which training never draws


def held_out_split(labels, fraction=HELD_OUT, cap=HELD_OUT_MAX):
    """(train, held-out) indices of a dataset without a test split of its own, stratified: the same fraction
    of every class (at least one image of a class with two or more), chosen by a fixed permutation, so every
    run and every script holds out the same images. The held-out part is never trained on: it is the FID
    reference and the data of every held-out figure."""
    labels = torch.as_tensor(labels)
    f = min(fraction, cap / len(labels))
    g = torch.Generator().manual_seed(0)
    train, held = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        k = max(int(len(idx) * f), 1 if len(idx) > 1 else 0)
        held += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(held)


def resize_crop(img, size):
    """Resize the short side to `size` (bicubic; up or down), then center-crop to size x size."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_folder(root, image_size, channels):
    """A folder of images, searched recursively. The first-level subfolder is the class label
    (only when every image sits in a subfolder); a .txt beside an image is its caption. Images are
    resized to image_size (upscaled when smaller, as torchvision's Resize does; one note says how many)."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                   if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise UserError(f"--data {root}: no images found (looked for {', '.join(IMAGE_EXTS)} recursively)")
    rel = [os.path.relpath(f, root) for f in files]
    labelled = all(os.sep in r for r in rel)
    class_names = sorted({r.split(os.sep)[0] for r in rel}) if labelled else None
    images, labels, captions, bad, small = [], [], [], 0, []
    for f, r in zip(files, rel):
        try:
            with Image.open(f) as im:
                im.load()
                if min(im.size) < MIN_SIDE:
                    raise UserError(f"--data {root}: image {r} is {im.size[0]}x{im.size[1]}, below "
                                    f"{MIN_SIDE} pixels; remove it")
                if min(im.size) < image_size:
                    small.append(im.size)
                im = resize_crop(im.convert("L" if channels == 1 else "RGB"), image_size)
        except UserError:
            raise
        except Exception:
            bad += 1
            continue
        pixels = np.asarray(im, dtype=np.uint8).reshape(image_size, image_size, channels)
        images.append(torch.from_numpy(pixels.copy()))
        labels.append(class_names.index(r.split(os.sep)[0]) if labelled else 0)
        txt = os.path.splitext(f)[0] + ".txt"
        caption = r.split(os.sep)[0] if labelled else ""                  # no .txt: the class name
        if os.path.exists(txt):
            caption = open(txt).read().strip()
        captions.append(caption)
    if not images:
        raise UserError(f"--data {root}: none of the {len(files)} image files could be read")
    if bad:
        warn(f"skipped {bad} unreadable image file(s) in {root}")
    if small:
        w, h = min(small, key=min)
        print(f"note: upscaled {len(small)} of {len(images)} images in {root} to {image_size}x{image_size} "
              f"(the smallest is {w}x{h})", file=sys.stderr)
    return TensorData(torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels),
                      class_names, captions)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles; allow only what they need (numpy arrays, builtins)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_cifar10(root, image_size, channels, names):
    """CIFAR-10 python format (the cifar-10-batches-py folder): the batch files `names`."""
    xs, ys = [], []
    for n in names:
        try:
            with open(os.path.join(root, n), "rb") as fh:
                d = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"]))
        except Exception as e:
            raise UserError(f"--data {root}: {n} is not a CIFAR-10 python batch ({e})")
    x = torch.from_numpy(np.concatenate(xs))
    labels = torch.from_numpy(np.concatenate(ys)).long()
    return TensorData(_fit(x, image_size, channels), labels, CIFAR_CLASSES)


def _fit(x, image_size, channels):
    """uint8 (N, C, h, w) -> uint8 (N, channels, image_size, image_size)."""
    if channels == 1 and x.shape[1] == 3:
        x = (x.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != image_size:
        x = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).contiguous()


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"--data: {path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise UserError(f"--data: {path} is truncated ({arr.size} bytes for shape {shape})")
    return arr.reshape(shape)


def load_mnist(root, image_size, channels, prefix):
    """MNIST IDX files (gzipped or not) <prefix>-images-idx3-ubyte[.gz] and the labels beside them."""
    for ext in ("", ".gz"):
        img = os.path.join(root, f"{prefix}-images-idx3-ubyte{ext}")
        lab = os.path.join(root, f"{prefix}-labels-idx1-ubyte{ext}")
        if os.path.exists(img) and os.path.exists(lab):
            x, y = _read_idx(img), _read_idx(lab)
            if len(x) != len(y):
                raise UserError(f"--data {root}: {len(x)} images but {len(y)} labels")
            x = torch.from_numpy(x.copy())[:, None]
            return TensorData(_fit(x, image_size, channels), torch.from_numpy(y.astype(np.int64)),
                              [str(i) for i in range(10)])
    return None


@functools.lru_cache(maxsize=2)
def _load_splits(spec, image_size, channels, signature):
    """(training part, held-out part) of a dataset on disk. CIFAR-10 and MNIST use their own test split when
    both are there; anything else is split by held_out_split. Cached: every script asks several times."""
    sub = os.path.join(spec, "cifar-10-batches-py")
    root = sub if os.path.isdir(sub) else spec
    files = os.listdir(root)
    if any(f.startswith("data_batch_") for f in files) or "test_batch" in files:
        train = sorted(f for f in files if re.fullmatch(r"data_batch_\d+", f))
        parts = [load_cifar10(root, image_size, channels, names) for names in (train, ["test_batch"])
                 if names and all(n in files for n in names)]
    elif any("idx3-ubyte" in f for f in files):
        parts = [load_mnist(spec, image_size, channels, p) for p in ("train", "t10k")]
        parts = [d for d in parts if d is not None]
        if not parts:
            raise UserError(f"--data {spec}: no MNIST IDX pair (train-images-idx3-ubyte[.gz] + labels) found")
    else:
        parts = [load_folder(spec, image_size, channels)]
    if len(parts) == 2:
        return parts[0], parts[1]
    data = parts[0]
    if len(data) < 2:
        raise UserError(f"--data {spec}: one image is not a dataset (nothing to hold out); give at least two")
    train, held = held_out_split(data.labels)
    return data.subset(train), data.subset(held)


def load_data(spec, image_size=32, channels=3, seed=0, train=True):
    """--data: 'shapes' (default, generated), a CIFAR-10 python folder, an MNIST IDX folder, or a
    folder of images. train=False gives the held-out part (shapes: another seed; CIFAR-10 and MNIST: their
    test split; a folder, or a dataset with one split only: held_out_split's part, never trained on)."""
    if spec == "shapes":
        return ShapesData(image_size, channels, seed=seed if train else seed + HELD_OUT_SEED)
    if not os.path.exists(spec):
        raise UserError(f"--data {spec}: no such file or folder; give 'shapes' or a path to images, "
                        "CIFAR-10 (cifar-10-batches-py) or MNIST IDX files")
    if not os.path.isdir(spec):
        raise UserError(f"--data {spec}: is a file; give the folder that holds the images or dataset files")
    folders = [d for d in (spec, os.path.join(spec, "cifar-10-batches-py")) if os.path.isdir(d)]
    # the cache sees files added or changed
    signature = [(d, e.name, e.stat().st_mtime_ns, e.stat().st_size) for d in folders for e in os.scandir(d)]
    return _load_splits(os.path.abspath(spec), image_size, channels, tuple(signature))[0 if train else 1]


def check_batch(data, batch_size, world=1, flag="--batch-size"):
    """Before any training: a finite dataset must fill one batch on every rank."""
    if not data.endless and len(data) < batch_size * world:
        raise UserError(f"{flag} {batch_size}{f' x {world} processes' if world > 1 else ''} is more than the "
                        f"{len(data)} training images; use {flag} {max(1, len(data) // world)} or less")


def grid_items(data, n, max_classes=16):
    """n items of `data` (the held-out part) for a conditional model's grid, spread evenly over the classes:
    with 2..max_classes classes, one row per class of ceil(n / classes) items each (so the grid may hold a
    few more than n; a class with fewer held-out items repeats them); otherwise the first n items.
    Returns (items, images per row or None)."""
    k = data.num_classes or 0
    if not 2 <= k <= max_classes:
        return [data[i if data.endless else i % len(data)] for i in range(n)], None
    per = math.ceil(n / k)
    rows = {c: [] for c in range(k)}
    for i in range(100 * k * per if data.endless else len(data)):
        c = data.label(i)
        if len(rows[c]) < per:
            rows[c].append(i)
        if all(len(r) == per for r in rows.values()):
            break
    idx = [r[j % len(r)] for r in rows.values() if r for j in range(per)]
    return [data[i] for i in idx], per


# How the streams of random numbers that one --seed gives are kept apart: each is seed * stride + its index,
# with strides larger than any index they meet (and prime, so that no two streams line up).
EPOCH_STRIDE = 1000            # batches: the shuffle of each epoch
FLIP_STRIDE = 7919             # batches: the flips of each step and rank
STEP_STRIDE = 1_000_003        # step_seed: the random draws of each step (+ stream, for other loops) ...
RANK_STRIDE = 7919             # ... and of each rank


def batches(data, batch_size, seed, step=0, rank=0, world=1, flip=False):
    """Endless batches (x, y, captions) for one rank, starting at `step`. Batch k is a pure function
    of (seed, k, rank), so a resumed run sees exactly the data an uninterrupted one would.
    Finite data: one shuffle per epoch, sharded across ranks; optional random horizontal flip."""
    while True:
        if data.endless:
            idx = [(step * world + rank) * batch_size + j for j in range(batch_size)]
        else:
            per_epoch = max(1, len(data) // (batch_size * world))
            epoch, k = divmod(step, per_epoch)
            g = torch.Generator().manual_seed(seed * EPOCH_STRIDE + epoch)
            perm = torch.randperm(len(data), generator=g)
            start = (k * world + rank) * batch_size
            idx = perm[start:start + batch_size].tolist()
            idx += perm[:batch_size - len(idx)].tolist()  # datasets smaller than one batch
        items = [data[i] for i in idx]
        x = torch.stack([it[0] for it in items])
        if flip:
            g = torch.Generator().manual_seed(seed * FLIP_STRIDE + step * world + rank)
            m = torch.rand(len(x), generator=g) < 0.5
            x[m] = x[m].flip(-1)
        yield x, torch.tensor([it[1] for it in items]), [it[2] for it in items]
        step += 1


#################################################################################
#          Training plumbing: device, DDP, EMA, optimizer, checkpoints          #
#################################################################################

def step_seed(seed, step, rank=0, stream=0):
    """The seed of every random draw of training step `step`: a pure function of (seed, rank, step),
    so --resume continues exactly. `stream` keeps apart loops that share --seed (e.g. a classifier's)."""
    return seed * STEP_STRIDE + rank * RANK_STRIDE + stream + step


def get_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return dev


def setup_distributed(device_arg):
    """Under torchrun: init the process group (nccl on GPU, gloo on CPU) and pick this rank's
    device. Returns (device, rank, world_size)."""
    if "RANK" not in os.environ:
        return get_device(device_arg), 0, 1
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
        return torch.device("cuda", local), rank, world
    return torch.device("cpu"), rank, world


def autocast(device, dtype):
    """bf16 autocast where asked (default on CUDA); fp32 otherwise."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext()
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise UserError(f"--dtype {dtype}: use auto, float32 or bfloat16")


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameters and buffers."""
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, m, 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def ema_decay(step, target):
    """EMA with warm-up: min(target, (1 + n) / (10 + n)), so early averages are not stuck at init."""
    return min(target, (1 + step) / (10 + step))


def make_optimizer(params, lr, weight_decay=0.0, betas=(0.9, 0.999), device=None):
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=1e-8,
                             **({"fused": True} if fused else {"foreach": True}))


def lr_at(step, lr, warmup):
    """Linear warm-up over `warmup` steps, then constant (Ho et al. 2020)."""
    return lr * min(1.0, (step + 1) / max(1, warmup))


def save_checkpoint(obj, path):
    """Atomic: write a temp file beside `path`, fsync, then rename over it. A crash mid-write
    leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def describe_unreadable(path, err):
    """What a file that torch.load could not read is, in words, for a one-line error."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    msg = ANSI.sub("", str(err))
    if size == 0:
        return "is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        return (f"is a damaged or truncated checkpoint ({size} bytes; its zip archive does not read: "
                f"{msg.splitlines()[0] if msg else type(err).__name__})")
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "is a .safetensors weights file, not a checkpoint of this repository; pass it with --weights"
    if head[:1] == b"\x80":
        return f"is a pickle that torch.load cannot read as a checkpoint ({size} bytes)"
    text = head.decode("utf-8", errors="replace")
    if all(c.isprintable() or c.isspace() for c in text):
        return f"is a text file, not a checkpoint (it starts with {text.splitlines()[0][:40]!r})"
    return (f"is not a PyTorch checkpoint (neither a zip archive nor a pickle: it starts with "
            f"{head[:4].hex()})")


def load_checkpoint(path, scripts):
    """torch.load(weights_only=True): tensors and plain data only, never code. `scripts` lists the
    scripts whose checkpoints this caller accepts."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} not found; train one first with `python {scripts[0]}.py --train`")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder; pass the checkpoint file (e.g. {path}/ckpt.pt)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = ANSI.sub("", str(e))
        what = [line for line in msg.splitlines() if "GLOBAL" in line]
        if not what:
            raise UserError(f"{path} {describe_unreadable(path, e)}")
        raise UserError(f"{path} holds more than tensors and plain data; refused to load it "
                        f"(weights_only=True): {what[0].strip()}")
    except Exception as e:
        raise UserError(f"{path} {describe_unreadable(path, e)}")
    if not isinstance(ck, dict) or ck.get("script") not in scripts:
        what = ck.get("script") if isinstance(ck, dict) else None
        raise UserError(f"{path} is {'a ' + what + '.py' if what else 'not a'} checkpoint, not one of "
                        f"{', '.join(s + '.py' for s in scripts)}; pass --ckpt with the right file")
    return ck


def load_state(module, state, path):
    """load_state_dict, or one UserError where the checkpoint was made by an older version of the network."""
    missing, extra, bad = check_mapping(module, state)
    if missing or extra or bad:
        raise UserError(f"{path} was made by an older version of this code ({len(missing)} of the network's "
                        f"tensors missing, {len(extra)} unexpected, {len(bad)} of another shape, e.g. "
                        f"{(missing + extra + bad)[0]}); train it again")
    module.load_state_dict(state)
    return module


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def all_finite(module):
    return all(torch.isfinite(p).all() for p in module.parameters())


#################################################################################
#                               The training loop                               #
#################################################################################

def resume_config(script, args, path=None, changeable=("max_steps",)):
    """--train --resume continues the checkpoint's run with its own config: only the `changeable` keys
    (--max-steps) may be given anew; without them the checkpoint's hold. A flag given with a value other
    than the checkpoint's is named in a warning, not dropped silently. Returns (config, checkpoint)."""
    path = path or os.path.join(args.out, "ckpt.pt")
    ck = load_checkpoint(path, [script])
    resume_seed(args, ck)
    cfg, given = dict(ck["config"]), getattr(args, "given", {})
    for k, v in given.items():
        if k in changeable:
            cfg[k] = v
        elif k in cfg and cfg[k] != v:
            flag = "--" + k.replace("_", "-")
            warn(f"--resume continues with the checkpoint's {flag} {cfg[k]}; {flag} {v} is ignored")
    return cfg, ck


def resume_seed(args, ck):
    """--resume draws step k's noise and data from the checkpoint's --seed, as the run would have: a --seed
    given with another value is named in a warning and ignored."""
    if "seed" not in ck:
        return
    if getattr(args, "seed_given", False) and args.seed != ck["seed"]:
        warn(f"--resume continues with the checkpoint's --seed {ck['seed']}; --seed {args.seed} is ignored")
    args.seed = ck["seed"]


def already_done(script, step, max_steps):
    """True, with a message, when --resume finds the run at its --max-steps already."""
    if step < max_steps:
        return False
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{script}: already at step {step} (--max-steps {max_steps}); nothing to train; give a larger "
              f"--max-steps to continue")
    return True


def start_training(script, args, cfg, ck=None, data=None):
    """What every --train needs before its networks exist: the device and, under torchrun, the process group;
    --resume's config and checkpoint (resume_config; or `ck`, read already); the training data (--data, or
    `data`), which must fill a batch on every rank. Returns a namespace: script, args, cfg, ck, data, device,
    rank, world and path, the checkpoint <out>/ckpt.pt."""
    device, rank, world = setup_distributed(args.device)
    if args.resume and ck is None:
        cfg, ck = resume_config(script, args)
    data = data or load_data(args.data, cfg["image_size"], cfg["channels"], seed=args.seed)
    check_batch(data, cfg["batch_size"], world)
    if cfg.get("num_classes") == "data":
        cfg["num_classes"] = data.num_classes
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return types.SimpleNamespace(script=script, args=args, cfg=cfg, ck=ck, data=data, device=device,
                                 rank=rank, world=world, path=os.path.join(args.out, "ckpt.pt"))


def restore(state, ck, path):
    """--resume: the checkpoint's entries into the networks and optimizers of `state` ({checkpoint key: module
    or optimizer}). Returns the step to continue from (0 without a checkpoint)."""
    if ck is None:
        return 0
    for name, part in state.items():
        if isinstance(part, nn.Module):
            load_state(part, ck[name], path)
        else:
            part.load_state_dict(ck[name])
    return ck["step"]


def save_state(path, state, step, **header):
    """The checkpoint of `state` at `step` (atomic), with the header's entries (script, config, seed, ...).
    Never one with weights that are not finite: then UserError, and the last good checkpoint stays."""
    if not all(all_finite(part) for part in state.values() if isinstance(part, nn.Module)):
        raise UserError(f"weights are not finite at step {step}; kept the last good checkpoint {path}")
    save_checkpoint({**header, **{k: part.state_dict() for k, part in state.items()}, "step": step}, path)


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def mean_losses(sums, counts, step, path, advice):
    """The mean of each loss since the last call, for the progress bar (the loop's only host sync); one that
    is not finite stops training before anything is saved."""
    means = {k: float(total) / counts[k] for k, total in sums.items()}
    sums.clear()
    counts.clear()
    if not all(math.isfinite(v) for v in means.values()):
        losses = ", ".join(f"{k} {v}" for k, v in means.items())
        raise UserError(f"training diverged: {losses} by step {step}; stopped without saving, the last good "
                        f"checkpoint {path} is kept; {advice}")
    return {k: f"{v:.4f}" for k, v in means.items()}


def train_loop(name, step_fn, save, step, total, path, cfg, batches=None, seed=0, stream=0, rank=0, world=1,
               grid=None, advice="try a lower --lr"):
    """The training loop of every network here, from `step` to `total`. Each step first seeds every random
    draw from (seed, rank, step, stream) (step_seed), so that --resume continues exactly; then
    step_fn(step, batch) makes one update and returns its losses {name: scalar}; batch is the next of
    `batches` (None: step_fn draws its own). Every cfg log_every steps, and before every save, the mean
    losses are shown (Progress) and checked: one that is not finite stops training (`advice` says what to
    try) and keeps the last good checkpoint. save(step) writes the checkpoint `path` every ckpt_every steps,
    at the end and on Ctrl-C, which stops after the current step (GracefulStop). grid(n) -> n images: a grid
    of 16 beside it every sample_every steps. Under torchrun every rank steps; rank 0 alone saves and draws.
    Returns the last step."""
    log_every, ckpt_every = cfg.get("log_every", 50), cfg.get("ckpt_every", 1000)
    sample_every, t0 = cfg.get("sample_every", 0), time.time()
    bar = Progress(total, step, name, disable=rank != 0)
    sums, counts = {}, {}
    with GracefulStop(enabled=world == 1) as stop:
        while step < total:
            torch.manual_seed(step_seed(seed, step, rank, stream))
            losses = step_fn(step, None if batches is None else next(batches))
            step += 1
            for k, v in losses.items():
                sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
            save_now = step % ckpt_every == 0 or step == total or stop.requested
            show = mean_losses(sums, counts, step, path, advice) if save_now or step % log_every == 0 else {}
            bar.update(**show)
            if grid and rank == 0 and sample_every and step % sample_every == 0 and step < total:
                with torch.no_grad():
                    save_grid(grid(16), os.path.join(os.path.dirname(path), f"samples_{step:06d}.png"))
            if save_now and rank == 0:
                save(step)
            stop.check(step, total, path)
    bar.close()
    if rank == 0:
        print(f"{name}: trained to step {step} in {time.time() - t0:.1f}s; checkpoint {path}")
    if world > 1:
        dist.barrier()
    return step


def train(script, args, cfg, build_model, objective, ck=None, data=None, extra_state=None, final_grid=True):
    """--train for a denoising network, build_model(cfg) (ddpm.py, ddim.py, guided.py, ldm.py): AdamW with
    warm-up, gradient clipping and an EMA of the weights, on --data (or `data`), through train_loop.
    objective(cfg, device) -> (loss_fn, sample_fn), called once the config and device are final:
    loss_fn(net, x, y, captions) -> scalar; sample_fn(ema, n) -> (n, C, H, W) in [-1, 1] for the periodic
    grids and, with final_grid, --n-samples (36) at the end. Resumes exactly (--resume, or the checkpoint
    `ck` of resume_config). extra_state() -> more checkpoint entries. Returns (ema, cfg)."""
    run = start_training(script, args, cfg, ck, data)
    cfg, device = run.cfg, run.device
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model.parameters(), cfg["lr"], cfg.get("weight_decay", 0.0), device=device)
    state = {"model": model, "ema": ema, "opt": opt}
    step = restore(state, run.ck, run.path)
    if already_done(script, step, cfg["max_steps"]):
        return ema, cfg
    loss_fn, sample_fn = objective(cfg, device)
    model.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
    net = torch.compile(model) if args.compile else model
    if run.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    amp = autocast(device, args.dtype)

    def step_fn(step, batch):
        x, y, captions = batch
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        set_lr(opt, lr_at(step, cfg["lr"], cfg.get("warmup", 0)))
        with amp:
            loss = loss_fn(net, x, y.to(device, non_blocking=True), captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.get("grad_clip"):
            nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"], foreach=True)
        opt.step()
        ema_update(ema, model, ema_decay(step, cfg["ema"]))
        return {"loss": loss.detach()}

    def grid(n):
        with amp:
            return sample_fn(ema, n)

    def save(step):
        save_state(run.path, state, step, script=script, config=cfg, seed=args.seed,
                   **(extra_state() if extra_state else {}))

    if run.rank == 0:
        print(f"{script}: {count_params(model) / 1e6:.2f}M parameters, {describe(run, step)}", flush=True)
    model.train()
    data_batches = batches(run.data, cfg["batch_size"], args.seed, step, run.rank, run.world,
                           flip=cfg.get("flip", False) and not run.data.endless)
    train_loop(script, step_fn, save, step, cfg["max_steps"], run.path, cfg, data_batches, args.seed,
               rank=run.rank, world=run.world, grid=grid)
    if run.rank == 0 and final_grid:
        torch.manual_seed(args.seed)
        path = os.path.join(args.out, "samples.png")
        with torch.no_grad():
            save_grid(grid(args.n_samples or 36), path)
        print(f"samples: {path}")
    return ema, cfg


def describe(run, step):
    """The header line's account of a training run: where it runs, its batch, its steps and its folder."""
    batch = run.cfg["batch_size"]
    return (f"device {run.device}, world size {run.world}, global batch {batch * run.world} = {batch} x "
            f"{run.world}, steps {step} -> {run.cfg['max_steps']}, out {run.args.out}")


#################################################################################
#                                     Images                                    #
#################################################################################

def to_uint8(x):
    """(N, C, H, W) in [-1, 1] -> uint8 numpy (N, H, W, C)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(x, nrow=None, pad=2):
    """(N, C, H, W) in [-1, 1] -> PIL image grid."""
    a = to_uint8(x)
    n, h, w, c = a.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    g = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        g[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = a[i]
    return Image.fromarray(g[:, :, 0] if c == 1 else g)


def save_grid(x, path, nrow=None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    make_grid(x, nrow).save(path)


def save_gif(frames, path, nrow=None, duration=60):
    """frames: list of (N, C, H, W) in [-1, 1] (e.g. a reverse-process trajectory) -> animated GIF;
    the last frame is held for a second."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ims = [make_grid(f, nrow).convert("RGB") for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], loop=0,
                duration=[duration] * (len(ims) - 1) + [1000])


#################################################################################
#                   The command line shared by all six scripts                  #
#################################################################################

def _checked(kind, ok, what):
    """An argparse type: kind(text), refused unless ok(value), with 'use <what>' as the message."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}")
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"{text}: use {what}")
        return v
    return parse


positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0, "a number > 0")
nonneg_float = _checked(float, lambda v: v >= 0, "a number >= 0")
unit_float = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
image_size = _checked(int, lambda v: v >= 8, "at least 8 (pixels)")


def existing_path(what, folder=False):
    """An argparse type for a path that must exist (a folder, with folder=True); `what` says what to give."""
    def parse(text):
        if not (os.path.isdir(text) if folder else os.path.exists(text)):
            raise argparse.ArgumentTypeError(f"{text}: no such {'folder' if folder else 'file or folder'}; "
                                             f"give {what}")
        return text
    return parse


class Parser(argparse.ArgumentParser):
    """argparse with the contract's errors (one line `error: ...`, exit status 2, through UserError). A flag
    may be declared with the flags it needs and those it excludes: add_argument(..., goes_with="--sample",
    excludes="--eta"), checked once the flags are read (see holds). --threads applies at once, before any
    tensor work."""

    weights = None  # what --weights loads into this script, in words (None: nothing yet)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rules = []

    def add_argument(self, *names, goes_with=None, excludes=(), **kwargs):
        action = super().add_argument(*names, **kwargs)
        self.rule(names[0], goes_with, excludes)
        return action

    def rule(self, flag, goes_with=None, excludes=()):
        """`flag` is refused without `goes_with` (a need, see holds) and beside any flag of `excludes`."""
        if goes_with or excludes:
            self.rules.append((flag, goes_with, [excludes] if isinstance(excludes, str) else list(excludes)))

    def given(self, args, flag, value=""):
        """Whether --flag was given (a switch: set; a value: not None), or given as `value`."""
        v = getattr(args, self._option_string_actions[flag].dest)
        return str(v) == value if value else v not in (None, False)

    def holds(self, args, need):
        """A need: '--eval' (given), '--sampler ddim' (given with that value), '--eval --sweep' (all of them),
        '--train or --weights' (either)."""
        for alternative in need.split(" or "):
            flags = re.findall(r"(--[\w-]+) ?([^-\s]\S*)?", alternative)        # [(flag, value or '')]
            if all(self.given(args, flag, value) for flag, value in flags):
                return True
        return False

    def error(self, message):
        message = re.sub(r"^argument (\S+): (\S+): ", r"\1 \2: ", message)  # '--lr -1: use a number > 0'
        raise UserError(f"{message} (python {self.prog} --help lists the flags)")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if hasattr(parsed, "seed"):      # None: not given (--resume then keeps the checkpoint's seed)
            parsed.seed_given, parsed.seed = parsed.seed is not None, parsed.seed or 0
        if getattr(parsed, "threads", None):
            torch.set_num_threads(parsed.threads)
        if getattr(parsed, "weights", None) and not self.weights:
            raise UserError(f"--weights: {self.prog} loads no released weights (the papers' published "
                            "models load into ddpm.py, ddim.py, guided.py, ldm.py and dreambooth.py; see the "
                            "README's 'Released weights')")
        for flag, need, excludes in self.rules:
            if self.given(parsed, flag) and need and not self.holds(parsed, need):
                raise UserError(f"{flag} goes with {need}")
            for other in excludes:
                if self.given(parsed, flag) and self.given(parsed, other):
                    raise UserError(f"give {flag} or {other}, not both")
        return parsed


def make_parser(script, description, presets, modes=(), gifs=False, weights=None):
    """The flags every script shares. `modes`: extra (flag, help) pairs exclusive with --train,
    --sample and --eval (e.g. ldm.py's --train-ae). gifs: the script's --sample writes GIFs (--no-gif).
    weights: what --weights loads into this script, in words; without it --weights is refused."""
    p = Parser(f"{script}.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.weights = weights
    mode = p.add_mutually_exclusive_group(required=True)
    for flag, text in modes:
        mode.add_argument(flag, action="store_true", help=text)
    mode.add_argument("--train", action="store_true", help="train (resumable; checkpoints in --out)")
    mode.add_argument("--sample", action="store_true",
                      help="write a PNG grid (and GIF) of samples from --ckpt")
    mode.add_argument("--eval", action="store_true",
                      help="sample and score; the last line printed is one JSON object")
    p.add_argument("--preset", choices=list(presets),
                   help="tiny: seconds, for tests; cpu: the default, minutes on a laptop CPU; "
                        "paper: the paper's configuration, for a GPU")
    p.add_argument("--data", default="shapes",
                   help="'shapes' (generated, default), or a folder of images (subfolders = classes, "
                        ".txt beside an image = caption), a CIFAR-10 cifar-10-batches-py folder, or an MNIST "
                        "IDX folder")
    p.add_argument("--image-size", type=image_size, help="image side in pixels (default: from the preset)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="1 (grayscale) or 3 (RGB; default)")
    p.add_argument("--out", default=f"out/{script}", help=f"output folder (default out/{script}/)")
    p.add_argument("--ckpt", help="checkpoint to sample/eval from (default <out>/ckpt.pt)")
    p.add_argument("--weights", metavar="PATH", help="--sample/--eval: a released model instead of --ckpt, a "
                   "file or folder you downloaded (never downloaded here): "
                   f"{weights or 'none loads into this script yet'}")
    p.add_argument("--resume", action="store_true", help="continue training from <out>/ckpt.pt exactly, with "
                   "its config (only --max-steps may change; default: the checkpoint's own)")
    p.add_argument("--max-steps", type=positive_int, help="total training steps (default: from the preset)")
    p.add_argument("--batch-size", type=positive_int, help="per-process batch size (default: from the "
                   "preset); --eval: the sampling batch (default 100; 500 on CUDA)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default: from the preset)")
    p.add_argument("--n-samples", type=positive_int, help="images to sample (--sample: 64; --eval: 1000)")
    p.add_argument("--steps", type=positive_int, help="sampling steps, for --sample and --eval alike "
                   "(default: the script's own; ddpm.py: all T)")
    p.add_argument("--fid-weights", metavar="PATH", goes_with="--eval",
                   type=existing_path("pt_inception-2015-12-05-6726825d.pth, pytorch-fid's FID weights "
                                      "(nothing is downloaded here)"),
                   help="--eval: also the standard Inception FID, from this pt_inception-2015-12-05 weights "
                        "file (never downloaded)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto (bfloat16 autocast on CUDA, float32 elsewhere), float32, bfloat16")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (slow to start; off by default)")
    p.add_argument("--seed", type=int, help="random seed (default 0; with --resume, the checkpoint's)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for PyTorch (default: PyTorch's "
                   "choice); --threads 1 is much faster on a CPU that other programs keep busy")
    if gifs:
        p.add_argument("--no-gif", action="store_true",
                       help="--sample: write only the PNG grid, not the GIF(s)")
    return p


def make_config(args, presets, keys=()):
    """The preset's plain dict, overridden by the flags the user gave: the contract's and the script's own
    `keys` (flag --a-b sets cfg['a_b']). args.given keeps those overrides, for --resume's warnings."""
    args.given = {k: getattr(args, k) for k in ("preset", "image_size", "channels", "max_steps", "batch_size",
                                                "lr", *keys) if getattr(args, k, None) is not None}
    args.preset = args.preset or "cpu"
    cfg = {**presets[args.preset], "preset": args.preset, **args.given}
    check_unet_size(cfg, presets[args.preset])
    check_unet_size(cfg, presets[args.preset], "clf_")
    return cfg


def check_unet_size(cfg, preset=None, prefix=""):
    """The U-Net halves its input len(ch_mult) - 1 times (ldm.py: its latent, image_size / f), and attends at
    the attn_res resolutions among those it visits: say so before any work when --image-size (or --f) does
    not allow it. prefix: another network's keys in the same config (guided.py's classifier: clf_). preset:
    the values to suggest (None for released weights, which have no preset)."""
    preset = preset or {}
    if prefix + "ch_mult" not in cfg:
        return
    f, size, levels = cfg.get("f", 1), cfg["image_size"], len(cfg[prefix + "ch_mult"])
    down, what = 2 ** (levels - 1), f"--image-size {size}" + (f" with --f {f}" if f > 1 else "")
    if size % (f * down):
        raise UserError(f"{what}: the input of this preset's U-Net ({size // f}px) must be divisible by "
                        f"{down}; use a multiple of {f * down}")
    seen = [size // f // 2 ** k for k in range(levels)]
    missing = [r for r in cfg.get(prefix + "attn_res", []) if r not in seen]
    if missing:
        fix = [f"--{k.replace('_', '-')} {preset[k]}" for k in ("image_size", "f")
               if k in preset and cfg[k] != preset[k]]
        raise UserError(f"{what}: the preset's attention at {missing[0]}px never occurs (the "
                        f"{'classifier' if prefix else 'U-Net'} works at {', '.join(map(str, seen))}px); "
                        f"use {' and '.join(fix) or 'another --image-size'}")


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


_HELD = {}  # --out folder -> its open, locked .lock file, while this process runs there


@contextmanager
def claim_out(out):
    """--out for the whole run: created and proved writable at start-up (not after the work is done), and
    locked so that a second run writing there at the same time stops with an error. The lock is the OS's
    lock on <out>/.lock (flock; msvcrt on Windows), which ends with the process however it ends, so a
    crashed run leaves no stale lock. Under torchrun only rank 0 writes, so only rank 0 claims."""
    if int(os.environ.get("RANK", 0)) != 0 or os.path.abspath(out) in _HELD:
        yield
        return
    try:
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e}); give a folder you can write "
                        "to")
    try:
        if os.name == "nt":
            import msvcrt
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise UserError(f"--out {out} is in use by another run ({who}); wait for it to end or give another "
                        "--out")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}: {' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}"[:300])
    f.flush()
    _HELD[os.path.abspath(out)] = f
    try:
        yield
    finally:
        del _HELD[os.path.abspath(out)]
        f.close()  # closing the file releases the lock


def run(args, train, sample, evaluate):
    """The mode the flags ask for, with --out claimed for the whole run (claim_out): sample(args, device) for
    --sample, evaluate(args, device) for --eval, else train() (--train, or a script's own training mode)."""
    with claim_out(args.out):
        if not (args.sample or args.eval):
            return train()
        device = get_device(args.device)
        return sample(args, device) if args.sample else evaluate(args, device)


class Progress:
    """A training loop's progress: tqdm's bar on a terminal; in a log file (stderr redirected) a plain line
    each time the loop reports numbers, instead of tqdm's carriage returns. update(**numbers) per step."""

    def __init__(self, total, initial=0, desc="", disable=False):
        self.tty, self.quiet = sys.stderr.isatty(), disable
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        disable=disable or not self.tty)
        self.total, self.n, self.n0, self.desc, self.t0 = total, initial, initial, desc, time.time()

    def update(self, **numbers):
        self.n += 1
        self.bar.update(1)
        if numbers:
            self.bar.set_postfix(numbers)
            if not (self.tty or self.quiet):
                rate = (self.n - self.n0) / max(time.time() - self.t0, 1e-9)
                shown = ", ".join(f"{k} {v}" for k, v in numbers.items())
                print(f"{self.desc}: step {self.n}/{self.total}, {shown}, {rate:.2f} steps/s, "
                      f"{(self.total - self.n) / rate / 60:.1f} min left", file=sys.stderr, flush=True)

    def close(self):
        self.bar.close()


def steps_bar(iterable, total, desc, show=True):
    """tqdm over a sampler's steps, shown only on a terminal (disable=None) and only when `show`."""
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=None if show else True)


class GracefulStop:
    """Ctrl-C in a training loop: the loop finishes its step, saves a checkpoint of it (atomically, as
    always) and stops; a second Ctrl-C stops at once, and the atomic save keeps the previous checkpoint.
    Single-process runs only: under torchrun the ranks would have to agree on the step, so there Ctrl-C
    stops at once and the last periodic checkpoint is what remains."""

    def __init__(self, enabled=True):
        self.requested, self.enabled, self.previous = False, enabled, None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def check(self, step, total, path):
        """After the save of `step`: raise Interrupted if Ctrl-C was pressed."""
        if self.requested:
            raise Interrupted(f"stopped at step {step} of {total}; saved {path}; continue with --train "
                              "--resume")


def main_guard(fn):
    """Run a script's main(): UserError -> one line on stderr and exit status 2; Ctrl-C -> status 130."""
    try:
        fn()
    except UserError as e:
        print(f"error: {ANSI.sub('', str(e))}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


#################################################################################
#          Evaluation: FID and KID on a judge, accuracy, Inception FID          #
#################################################################################
# The standard FID network (Inception-v3) cannot be downloaded here, so FID (Heusel et al. 2017)
# and KID (Binkowski et al. 2018) are computed on the penultimate features of a small CNN, the
# judge, trained on the data's own attributes (shapes) or class labels and cached in out/judge/.
# Its numbers compare runs and scripts of this repository, not papers; where the user has the
# standard weights file, --fid-weights adds the Inception FID that papers report.

JUDGE_DIR = os.path.join("out", "judge")   # relative to the working directory
JUDGE_STEPS = 800                          # about a minute on one CPU core; tiny presets set judge_steps
SUBJECT_JUDGE_SEED = 77                    # seed + this: the subject judge's images, apart from the data's
SHAPE_HEADS = {"shape": SHAPES, "color": list(COLORS), "size": SIZES, "position": POSITIONS}


class Judge(nn.Module):
    """A small CNN with one classification head per attribute. heads: {name: [class names]}, e.g.
    SHAPE_HEADS on shapes or {"label": class_names} on labelled data. features(x) is the layer FID
    and KID compare, times a fixed `scale` that gives held-out real images a mean square of 1 (so
    the numbers do not depend on an arbitrary activation scale); forward(x) gives {head: logits}."""

    def __init__(self, heads, channels=3, width=32, dim=128):
        super().__init__()
        self.classes = {k: list(v) for k, v in heads.items()}
        w = width

        def conv(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        # (N, 4w, 4, 4) before the linear layer: the features keep where things are
        self.body = nn.Sequential(*conv(channels, w, 1), *conv(w, w, 2),           # (N, w, H/2, W/2)
                                  *conv(w, 2 * w, 1), *conv(2 * w, 2 * w, 2),       # (N, 2w, H/4, W/4)
                                  *conv(2 * w, 4 * w, 2), nn.AdaptiveAvgPool2d(4),  # (N, 4w, 4, 4)
                                  nn.Flatten(), nn.Linear(64 * w, dim), nn.SiLU())  # (N, dim)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, len(v)) for k, v in self.classes.items()})
        self.register_buffer("scale", torch.ones(()))

    def features(self, x):
        return self.body(x) * self.scale

    def forward(self, x):
        f = self.body(x)
        return {k: head(f) for k, head in self.heads.items()}


def _float_images(x):
    """uint8 images -> [-1, 1]; float images pass through."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def features(net, x, batch=250):
    """net.features over images x (N, C, H, W) (uint8, or float in [-1, 1]) in batches on the net's
    device -> (N, D) float32 on the CPU (the statistics cast to float64 there: MPS has no float64)."""
    dev = next(net.parameters()).device
    return torch.cat([net.features(_float_images(x[i:i + batch]).to(dev)).float().cpu()
                      for i in range(0, len(x), batch)])


@torch.no_grad()
def judge_predict(judge, x, batch=250):
    """The judge's class index per head for images x -> {head: (N,) long}."""
    dev = next(judge.parameters()).device
    out = [{k: v.argmax(1).cpu() for k, v in judge(_float_images(x[i:i + batch]).to(dev)).items()}
           for i in range(0, len(x), batch)]
    return {k: torch.cat([o[k] for o in out]) for k in judge.classes}


@torch.no_grad()
def judge_confident(judge, x, threshold=0.9, batch=250):
    """The fraction of images x that the judge puts in one class with probability > threshold on every head:
    samples that look like some class rather than in between (for an unconditional model: readable ones)."""
    dev = next(judge.parameters()).device
    sure = [torch.stack([v.softmax(1).amax(1) for v in judge(_float_images(x[i:i + batch]).to(dev)).values()])
            .amin(0).cpu() > threshold for i in range(0, len(x), batch)]
    return torch.cat(sure).float().mean().item()


def _judge_set(data, idx):
    """Items idx of `data` -> images uint8 (N, C, H, W) and targets {head: (N,) long}."""
    if isinstance(data, ShapesData):
        x = torch.stack([data[i][0] for i in idx])
        attrs = [data.attributes(i) for i in idx]
        y = {k: torch.tensor([names.index(a[k]) for a in attrs]) for k, names in SHAPE_HEADS.items()}
        return ((x + 1) * 127.5).round().to(torch.uint8), y
    idx = torch.as_tensor(list(idx), dtype=torch.long)
    return data.images[idx], {"label": data.labels[idx].long()}


def judge_accuracy(judge, x, y):
    """Accuracy per head on images x with targets y, and "all" (every head right) with several heads."""
    pred = judge_predict(judge, x)
    hits = {k: pred[k] == y[k] for k in y}
    acc = {k: h.float().mean().item() for k, h in hits.items()}
    if len(hits) > 1:
        acc["all"] = torch.stack(list(hits.values())).all(0).float().mean().item()
    return acc


def fit_judge(judge, x, y, steps, device, batch_size=64, cosine=True, seed=0):
    """Train a Judge on images x (uint8, or float in [-1, 1]) with targets y {head: (N,) long}: AdamW at 2e-3
    (decayed to 0 on a cosine with cosine=True), batches drawn with a fixed seed. Returns it in eval mode."""
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for step in steps_bar(range(steps), steps, "training the judge"):
        i = torch.randint(len(x), (batch_size,), generator=g)
        if cosine:
            set_lr(opt, 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        logits = judge(_float_images(x[i]).to(device))
        loss = sum(F.cross_entropy(logits[k], y[k][i].to(device)) for k in y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return judge.eval()


def train_judge(data_spec, image_size, channels, device, steps=JUDGE_STEPS, batch_size=64, seed=0):
    """Train a Judge deterministically (fixed seed and data order). shapes: up to 5000 generated images,
    accuracy on 1000 of the held-out split; labelled data: the training part, accuracy on the held-out
    part (load_data). Returns the checkpoint dict, or None for data without class labels."""
    t0, c0 = time.time(), time.process_time()
    data = load_data(data_spec, image_size, channels, seed=0, train=True)
    held = load_data(data_spec, image_size, channels, seed=0, train=False)
    if isinstance(data, ShapesData):
        heads = SHAPE_HEADS
        xtr, ytr = _judge_set(data, range(min(5000, steps * batch_size)))
        xte, yte = _judge_set(held, range(1000))
    else:
        if not data.class_names or len(data.class_names) < 2:
            return None
        heads = {"label": data.class_names}
        xtr, ytr = _judge_set(data, range(len(data)))
        xte, yte = _judge_set(held, range(len(held)))
    torch.manual_seed(seed)
    judge = fit_judge(Judge(heads, channels).to(device), xtr, ytr, steps, device, batch_size, seed=seed)
    judge.scale.fill_(features(judge, xte).square().mean().rsqrt().item())
    return {"script": "judge", "data": data_spec, "image_size": image_size, "channels": channels,
            "steps": steps, "heads": heads, "model": {k: v.cpu() for k, v in judge.state_dict().items()},
            "accuracy": judge_accuracy(judge, xte, yte), "n_train": len(xtr), "n_test": len(xte),
            "train_seconds": time.time() - t0, "train_cpu_seconds": time.process_time() - c0}


def subject_judge(size, channels, device, steps=400, seed=0):
    """dreambooth.py's judge of its shapes subject: a Judge with one head, {ordinary, subject}, trained on
    circles with and without the subject's hole (ShapesData(subject=True) vs the same attributes drawn
    plainly); cached in out/judge/."""
    path = os.path.join(JUDGE_DIR, f"subject_ring_{size}_{channels}_s{steps}.pt")
    heads = {"subject": ["ordinary", "subject"]}
    judge = Judge(heads, channels)
    if os.path.exists(path):
        ck = load_checkpoint(path, ["judge"])
        judge.load_state_dict(ck["model"])
        judge.accuracy = ck["accuracy"]["subject"]
        return judge.to(device).eval()

    def batch(start, n):
        data = ShapesData(size, channels, seed=seed + SUBJECT_JUDGE_SEED, subject=True)
        xs = []
        for i in range(start, start + n):
            a = {**data.attributes(i), "subject": bool(i % 2)}
            xs.append(to_tensor(draw_shape(a, size, channels, a["jitter"])))
        return torch.stack(xs), torch.arange(start, start + n) % 2

    print(f"training the subject judge ({steps} steps), cached in {path}")
    torch.manual_seed(seed)
    x, y = batch(0, min(4000, steps * 32))
    judge = fit_judge(judge.to(device), x, {"subject": y}, steps, device, 32, cosine=False, seed=seed)
    xt, yt = batch(10 ** 6, 400)
    judge.accuracy = (judge_predict(judge, xt)["subject"] == yt).float().mean().item()
    save_checkpoint({"script": "judge", "heads": heads, "accuracy": {"subject": judge.accuracy},
                     "model": {k: v.cpu() for k, v in judge.state_dict().items()}}, path)
    print(f"subject judge: held-out accuracy {judge.accuracy:.3f}")
    return judge


def judge_path(data_spec, image_size, channels, steps=JUDGE_STEPS, cache_dir=JUDGE_DIR):
    """out/judge/judge_<data>_<size>_<channels>[_s<steps>].pt; <data> is 'shapes' or the folder's
    name plus a hash of its absolute path."""
    name = "shapes"
    if data_spec != "shapes":
        p = os.path.abspath(data_spec)
        name = f"{os.path.basename(p) or 'data'}-{hashlib.sha1(p.encode()).hexdigest()[:8]}"
    tag = "" if steps == JUDGE_STEPS else f"_s{steps}"
    return os.path.join(cache_dir, f"judge_{name}_{image_size}_{channels}{tag}.pt")


def get_judge(data_spec, image_size, channels, device, steps=JUDGE_STEPS, cache_dir=JUDGE_DIR):
    """The judge for --data at this size: loaded from its cache file, or trained and cached there
    (atomically). Data without class labels (a folder of loose images) is judged with the shapes
    judge's features instead. judge.accuracy holds its held-out accuracy, which is printed."""
    path = judge_path(data_spec, image_size, channels, steps, cache_dir)
    if os.path.exists(path):
        ck = load_checkpoint(path, ["judge"])
    else:
        print(f"training the judge for --data {data_spec} at {image_size}px ({steps} steps), cached in "
              f"{path}")
        ck = train_judge(data_spec, image_size, channels, device, steps)
        if ck is None:
            print(f"note: --data {data_spec} has no class labels; FID/KID use the shapes judge's features",
                  file=sys.stderr)
            return get_judge("shapes", image_size, channels, device, steps, cache_dir)
        try:
            save_checkpoint(ck, path)
        except OSError as e:
            warn(f"could not cache the judge in {path} ({e.strerror or e}); it is trained again next time")
        print(f"trained the judge in {ck['train_seconds']:.0f}s")
    judge = Judge(ck["heads"], channels)
    try:
        judge.load_state_dict(ck["model"])
    except RuntimeError:
        raise UserError(f"{path} does not fit this version's judge; delete it and it is retrained")
    judge.accuracy = ck["accuracy"]
    print(f"judge {path}: held-out accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in judge.accuracy.items()))
    return judge.to(device).eval()


def feature_stats(f):
    """Mean (D,) and covariance (D, D) of features f (N, D), in float64."""
    f = f.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (len(f) - 1)


def sqrtm_psd(a):
    """Square root of a symmetric positive semi-definite matrix, via its eigendecomposition."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, s1, mu2, s2):
    """Frechet distance between N(mu1, s1) and N(mu2, s2), in float64:
    ||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2)). With r = s1^(1/2), s1 s2 = r (r s2 r) r^-1
    has the eigenvalues of the symmetric PSD r s2 r, so tr((s1 s2)^(1/2)) = sum sqrt(eig(r s2 r))."""
    mu1, s1, mu2, s2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, s1, mu2, s2))
    r = sqrtm_psd(s1)
    m = r @ s2 @ r
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean).item()


def kid(f1, f2, subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance: the unbiased estimate of MMD^2 with the kernel k(x, y) =
    (x.y / D + 1)^3, averaged over random subsets (one pass over everything when both sets fit)."""
    f1, f2 = f1.double(), f2.double()
    m = min(len(f1), len(f2), subset_size)
    if m == len(f1) == len(f2):
        subsets = 1
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        x = f1[torch.randperm(len(f1), generator=g)[:m]]
        y = f2[torch.randperm(len(f2), generator=g)[:m]]
        kxx, kyy, kxy = [(a @ b.T / f1.shape[1] + 1) ** 3 for a, b in ((x, x), (y, y), (x, y))]
        off = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))  # drop the i = j terms
        vals.append((off(kxx) + off(kyy) - 2 * kxy.mean()).item())
    return float(np.mean(vals))


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019) on features (N, D): each set's manifold is
    the union of balls reaching each point's k-th nearest neighbour in its own set. Precision: the fraction
    of fake points inside the real manifold (fidelity); recall: of real points inside the fake one
    (diversity, mode coverage)."""
    real, fake = real.double(), fake.double()
    radius = lambda f: torch.cdist(f, f).kthvalue(min(k, len(f) - 1) + 1, dim=1).values  # + 1: itself at 0
    d = torch.cdist(fake, real)                                            # (N_fake, N_real)
    return {"precision": (d <= radius(real)[None]).any(1).double().mean().item(),
            "recall": (d.T <= radius(fake)[None]).any(1).double().mean().item()}


def fid_kid(net, fake, real):
    """FID and KID between two image sets (N, C, H, W) on net.features (the judge, or InceptionFID)."""
    return feature_scores(features(net, fake), features(net, real))


def feature_scores(f1, f2):
    """FID and KID between two feature sets (N, D)."""
    return {"fid": frechet_distance(*feature_stats(f1), *feature_stats(f2)), "kid": kid(f1, f2)}


def parse_caption(caption):
    """The attributes a caption names, the inverse of shape_caption: 'a red circle on the left' ->
    {'color': 'red', 'shape': 'circle', 'position': 'left'}. Attributes not named are left out."""
    vocab = {w: ("shape", s) for s in SHAPES for w in (s, s + ("es" if s.endswith("s") else "s"))}
    vocab.update({c: ("color", c) for c in COLORS})
    vocab.update({s: ("size", s) for s in SIZES})
    vocab.update({p: ("position", p) for p in POSITIONS})
    out = {}
    for word in re.findall(r"[a-z]+", caption.lower()):
        if word in vocab:
            key, value = vocab[word]
            if out.get(key, value) != value:
                raise UserError(f"caption '{caption}' names two {key}s ({out[key]} and {value})")
            out[key] = value
    return out


def _wanted(judge, w):
    """What was asked, as {head: class name}: a class label (int), a caption or an attribute dict."""
    if isinstance(w, (int, np.integer)) or (torch.is_tensor(w) and w.ndim == 0):
        head = "label" if "label" in judge.classes else "shape"  # the shapes label is the shape index
        return {head: judge.classes[head][int(w)]}
    if isinstance(w, str):
        return {"label": w} if "label" in judge.classes else parse_caption(w)
    return {k: v for k, v in w.items() if k in judge.classes}  # drops jitter, subject


def psnr(x, rec):
    """Per-image PSNR in dB on [0, 1] pixels, averaged: x, rec (N, C, H, W) in [-1, 1]."""
    mse = ((rec.float().clamp(-1, 1) - x.float()) / 2).square().flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


def attribute_accuracy(judge, images, wanted):
    """Fraction of images (N, C, H, W) whose judged attributes match what was asked: wanted[i] is a
    class label, a caption or an attribute dict. An image counts only if every named attribute matches."""
    pred = judge_predict(judge, images)
    ok = 0
    for i, w in enumerate(wanted):
        w = _wanted(judge, w)
        for k, v in w.items():
            if v not in judge.classes[k]:
                raise UserError(f"cannot judge {k} '{v}': the judge knows {', '.join(judge.classes[k])}")
        ok += all(judge.classes[k][pred[k][i]] == v for k, v in w.items())
    return ok / len(wanted)


# The standard FID network: Inception-v3 as in TensorFlow's 2015-12-05 graph (the pytorch-fid port).

class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU, named like the weights file's keys."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Mixed(nn.Module):
    """One Inception block: parallel branches concatenated on channels. A branch is a chain of links
    (name, cin, cout, kernel, stride, padding); a link given as a list is several convs side by side
    (InceptionE). The pool branch: 'avg' (3x3, averaging only real pixels as TF does) or 'max' (3x3,
    stride 1), each followed by the conv branch_pool; or 'down' (3x3 stride-2 max pool, no conv)."""

    def __init__(self, branches, pool, cin=None, pool_ch=None):
        super().__init__()
        self.chains, self.pool = [], pool
        for chain in branches:
            links = [link if isinstance(link, list) else [link] for link in chain]
            for name, *conv in (c for link in links for c in link):
                setattr(self, name, ConvBN(*conv))
            self.chains.append([[c[0] for c in link] for link in links])
        if pool != "down":
            self.branch_pool = ConvBN(cin, pool_ch, 1)

    def forward(self, x):
        outs = []
        for chain in self.chains:
            h = x
            for names in chain:
                h = torch.cat([getattr(self, n)(h) for n in names], 1)
            outs.append(h)
        if self.pool == "down":
            return torch.cat(outs + [F.max_pool2d(x, 3, 2)], 1)
        if self.pool == "avg":
            p = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        else:
            p = F.max_pool2d(x, 3, 1, 1)
        return torch.cat(outs + [self.branch_pool(p)], 1)


def _inception_a(cin, pool_ch):  # 35x35: cin -> 224 + pool_ch channels
    return Mixed([[("branch1x1", cin, 64, 1)],
                  [("branch5x5_1", cin, 48, 1), ("branch5x5_2", 48, 64, 5, 1, 2)],
                  [("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1),
                   ("branch3x3dbl_3", 96, 96, 3, 1, 1)]], "avg", cin, pool_ch)


def _inception_b(cin):  # 35x35 -> 17x17, cin -> 480 + cin
    return Mixed([[("branch3x3", cin, 384, 3, 2)],
                  [("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1),
                   ("branch3x3dbl_3", 96, 96, 3, 2)]], "down")


def _inception_c(cin, c7):  # 17x17, factorized 7x7 convs: cin -> 768
    one_seven, seven_one = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return Mixed([[("branch1x1", cin, 192, 1)],
                  [("branch7x7_1", cin, c7, 1), ("branch7x7_2", c7, c7, *one_seven),
                   ("branch7x7_3", c7, 192, *seven_one)],
                  [("branch7x7dbl_1", cin, c7, 1), ("branch7x7dbl_2", c7, c7, *seven_one),
                   ("branch7x7dbl_3", c7, c7, *one_seven), ("branch7x7dbl_4", c7, c7, *seven_one),
                   ("branch7x7dbl_5", c7, 192, *one_seven)]], "avg", cin, 192)


def _inception_d(cin):  # 17x17 -> 8x8, cin -> 512 + cin
    return Mixed([[("branch3x3_1", cin, 192, 1), ("branch3x3_2", 192, 320, 3, 2)],
                  [("branch7x7x3_1", cin, 192, 1), ("branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
                   ("branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)), ("branch7x7x3_4", 192, 192, 3, 2)]],
                 "down")


def _inception_e(cin, pool):  # 8x8: cin -> 2048
    fork = lambda p: [(p + "a", 384, 384, (1, 3), 1, (0, 1)), (p + "b", 384, 384, (3, 1), 1, (1, 0))]
    return Mixed([[("branch1x1", cin, 320, 1)],
                  [("branch3x3_1", cin, 384, 1), fork("branch3x3_2")],
                  [("branch3x3dbl_1", cin, 448, 1), ("branch3x3dbl_2", 448, 384, 3, 1, 1),
                   fork("branch3x3dbl_3")]], pool, cin, 192)


class InceptionFID(nn.Module):
    """The FID Inception-v3 (torchvision's layout, TF's average pools, a max pool in Mixed_7c), to load
    pt_inception-2015-12-05-6726825d.pth with InceptionFID.load(path); nothing is ever downloaded.
    features(x): images (N, C, H, W) in [-1, 1], resized to 299x299 -> pool3 features (N, 2048)."""
    BLOCKS = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = ConvBN(3, 32, 3, 2), ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = ConvBN(32, 64, 3, 1, 1), ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c = _inception_a(192, 32), _inception_a(256, 64)
        self.Mixed_5d = _inception_a(288, 64)
        self.Mixed_6a = _inception_b(288)
        self.Mixed_6b, self.Mixed_6c = _inception_c(768, 128), _inception_c(768, 160)
        self.Mixed_6d, self.Mixed_6e = _inception_c(768, 160), _inception_c(768, 192)
        self.Mixed_7a = _inception_d(768)
        self.Mixed_7b, self.Mixed_7c = _inception_e(1280, "avg"), _inception_e(2048, "max")
        self.fc = nn.Linear(2048, 1008)  # ImageNet logits: in the weights file, not used by FID

    def features(self, x):
        x = x.float().expand(-1, 3, -1, -1)                                   # grayscale -> RGB
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))    # (N, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))    # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, 2)                                            # (N, 192, 35, 35)
        for name in self.BLOCKS:
            x = getattr(self, name)(x)                                       # ... (N, 2048, 8, 8)
        return x.mean((2, 3))                                                # (N, 2048)

    @classmethod
    def load(cls, path):
        """The network with the weights in `path` (weights_only load); UserError unless it is exactly
        the FID Inception's state dict."""
        if not os.path.isfile(path):
            raise UserError(f"--fid-weights {path}: no such file; get pt_inception-2015-12-05-6726825d.pth "
                            "(pytorch-fid's FID weights) yourself, nothing is downloaded here")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"--fid-weights {path}: not a readable weights file ({str(e).splitlines()[0]})")
        net = cls()
        counter = "num_batches_tracked"
        want = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith(counter)}
        got = {k: v for k, v in sd.items() if not k.endswith(counter)} if isinstance(sd, dict) else {}
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        bad = sorted(k for k in want.keys() & got.keys()
                     if not torch.is_tensor(got[k]) or tuple(got[k].shape) != want[k])
        if missing or extra or bad:
            first = (missing + extra + bad)[0]
            raise UserError(f"--fid-weights {path}: not the pt_inception-2015-12-05 FID weights "
                            f"({len(missing)} missing, {len(extra)} unexpected, {len(bad)} wrongly shaped "
                            f"keys, e.g. {first})")
        net.load_state_dict(got, strict=False)  # strict on everything but BatchNorm's step counters
        return net.eval()


def quantize(x):
    """Round images in [-1, 1] to the 256 levels a saved PNG has."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def eval_order(held, n):
    """The order evaluate() takes held-out items in: the first 2n of endless data, else a fixed permutation
    (the first n are compared with the samples, the next n give the real-vs-real floor)."""
    if held.endless:
        return list(range(2 * n))
    return torch.randperm(len(held), generator=torch.Generator().manual_seed(0)).tolist()


def held_out_images(spec, image_size, channels, n):
    """The (at most n) held-out images evaluate() compares n samples with, in its order: (N, C, H, W)."""
    held = load_data(spec, image_size, channels, train=False)
    return torch.stack([held[i][0] for i in eval_order(held, n)[:n]])


def evaluate(script, args, cfg, sample_fn, nfe, device, cond=None, info=None, diversity=False):
    """--eval: draw --n-samples images (default 1000) with sample_fn(k, wanted) -> (k, C, H, W) in
    [-1, 1], in batches of --batch-size (default 100 on CPU, 500 on CUDA), and time them. wanted is
    None (cond=None), or the k class labels (cond='label') or captions (cond='caption') of the
    held-out images the samples are compared with. Scores: FID and KID against as many held-out real
    images on the judge's features; fid_floor, the FID of the other held-out images (n of them, or at least
    half as many: fid_floor_n) against the same ones, what a perfect model would score; confident (and
    confident_real, of those real images), the fraction the judge puts in one class with probability
    > 0.9; acc, the fraction of samples the judge finds to be what was asked (conditional only);
    fid_inception with --fid-weights. diversity: also improved precision and recall on the judge's features
    and, on shapes, combo_coverage: the fraction of the shape x color combinations the judge finds in at
    least 1% of the samples (mode coverage). nfe (network evaluations per image) and info go into the
    result as they are. Prints it as JSON, the last line of stdout, and returns it."""
    n = args.n_samples or 1000
    if n < 2:
        raise UserError(f"--n-samples {n}: --eval needs at least 2 samples")
    size, ch = cfg["image_size"], cfg["channels"]
    inception = InceptionFID.load(args.fid_weights).to(device) if args.fid_weights else None
    judge = get_judge(args.data, size, ch, device, steps=cfg.get("judge_steps", JUDGE_STEPS))
    held = load_data(args.data, size, ch, train=False)
    order = eval_order(held, n)
    items = [held[i] for i in order[:n]]
    real = torch.stack([it[0] for it in items])                              # (<=n, C, H, W)
    field = 1 if cond == "label" else 2                                      # the label or the caption
    wanted = None if cond is None else [items[i % len(items)][field] for i in range(n)]
    bs = args.batch_size or (500 if device.type == "cuda" else 100)
    torch.manual_seed(args.seed)
    fake, t0 = [], time.time()
    for s in steps_bar(range(0, n, bs), math.ceil(n / bs), f"{script} --eval: sampling"):
        fake.append(sample_fn(min(bs, n - s), None if wanted is None else wanted[s:s + bs]).float().cpu())
    sec = (time.time() - t0) / n
    fake = quantize(torch.cat(fake))                                         # (n, C, H, W)
    f_fake, f_real = features(judge, fake), features(judge, real)           # once, for every score below
    res = {"script": script, "data": args.data, "n_samples": n, **(info or {}), "nfe": nfe,
           "sec_per_image": round(sec, 5), **feature_scores(f_fake, f_real)}
    rest = order[n:2 * n]
    if len(rest) >= max(2, n // 2):
        f_real2 = features(judge, torch.stack([held[i][0] for i in rest]))
        res["fid_floor"], res["fid_floor_n"] = feature_scores(f_real2, f_real)["fid"], len(rest)
    res["confident"], res["confident_real"] = judge_confident(judge, fake), judge_confident(judge, real)
    if cond is not None:
        res["acc"] = attribute_accuracy(judge, fake, wanted)
    res["judge_acc"] = judge.accuracy.get("all", judge.accuracy.get("label"))
    if inception is not None:
        res["fid_inception"] = fid_kid(inception, fake, real)["fid"]
    if diversity:
        res.update(precision_recall(f_real, f_fake))
    if diversity and {"shape", "color"} <= set(judge.classes):
        p, k = judge_predict(judge, fake), len(judge.classes["color"])
        counts = torch.bincount(p["shape"] * k + p["color"], minlength=len(judge.classes["shape"]) * k)
        res["combo_coverage"] = (counts >= max(1, math.ceil(0.01 * n))).double().mean().item()
    grid = os.path.join(args.out, "eval_samples.png")
    save_grid(fake[:64], grid)
    accuracy = f", accuracy {res['acc']:.3f}" if "acc" in res else ""
    accuracy += "".join(f", {k} {res[k]:.4f}" for k in ("precision", "recall", "combo_coverage") if k in res)
    print(f"{script} --eval: FID {res['fid']:.4f} (real-vs-real floor {res.get('fid_floor', math.nan):.4f}), "
          f"KID {res['kid']:.5f}, judged with confidence > 0.9: {res['confident']:.3f}{accuracy}; "
          f"{sec:.4f} s/image at {nfe} NFE; {grid}")
    print(json.dumps(res))
    return res


#################################################################################
#                  Sweeps: one --eval per setting, then tables                  #
#################################################################################

def sweep(args, settings, evaluate_one, folder):
    """--eval --sweep: evaluate_one(setting) -> a result row, for each setting in turn, each writing its
    eval_samples.png into its own <out>/sweep_<folder(setting)>/. Returns the rows."""
    rows, out = [], args.out
    for setting in settings:
        args.out = os.path.join(out, f"sweep_{folder(setting)}")
        rows.append(evaluate_one(setting))
    args.out = out
    return rows


def table(rows, columns):
    """Print a markdown table, a line per row; columns: (title, key, format) as ("FID", "fid", "{:.2f}")."""
    print("\n| " + " | ".join(title for title, _, _ in columns) + " |")
    print("|---" * len(columns) + "|")
    for r in rows:
        print("| " + " | ".join(fmt.format(r.get(key, math.nan)) for _, key, fmt in columns) + " |")


def cross_table(rows, corner, line_key, column_key, value, fmt, column_title="S={}"):
    """Print a markdown table of `value`: a line per distinct line_key (in order of appearance), a column per
    distinct column_key (sorted); '-' where no row has the pair."""
    lines = list(dict.fromkeys(r[line_key] for r in rows))
    columns = sorted({r[column_key] for r in rows})
    cells = {(r[line_key], r[column_key]): fmt.format(r[value]) for r in rows}
    print(f"\n| {corner} | " + " | ".join(column_title.format(c) for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for line in lines:
        print(f"| {line} | " + " | ".join(cells.get((line, c), "-") for c in columns) + " |")


def print_sweep(script, rows, n):
    """The sweep's result as one JSON object, the last line printed."""
    print(json.dumps({"script": script, "mode": "sweep", "n_samples": n, "rows": rows}))


#################################################################################
#                Released weights: reading, recognising, renaming               #
#################################################################################
# Like nanoGPT's GPT.from_pretrained, the papers' own networks run through the readable code: a mapping only
# renames tensors, splits fused ones and permutes axes; it never changes a weight. Nothing is downloaded.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32,
                      "U64": torch.uint64}


def read_safetensors(path, flag="--weights"):
    """A .safetensors file -> {name: tensor}, with the standard library and torch only. The format: 8 bytes,
    a little-endian u64 n; n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}} (plus an
    optional "__metadata__"); then the raw little-endian data, offsets counted from its start. The file is
    memory-mapped copy-on-write: a 4 GB file costs no memory until a tensor is read, and is never written."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise UserError(f"{flag} {path}: not a .safetensors file (its first 8 bytes give a header of {n} "
                            f"bytes; the file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise UserError(f"{flag} {path}: not a .safetensors file (its header is not JSON: {e})")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise UserError(f"{flag} {path}: tensor {name} has dtype {info.get('dtype')}, which torch "
                            "cannot hold")
        begin, end = (8 + n + o for o in info["data_offsets"])
        if end > size:
            raise UserError(f"{flag} {path} is truncated: tensor {name} ends at byte {end}, the file has "
                            f"{size} bytes; download it again")
        count = math.prod(info["shape"])
        if end - begin != count * dtype.itemsize:
            raise UserError(f"{flag} {path}: tensor {name} has {end - begin} bytes for shape {info['shape']}")
        raw = torch.frombuffer(data, dtype=torch.uint8, offset=begin, count=end - begin) if count else \
            torch.empty(0, dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(info["shape"])
    return tensors


def inert(name):
    """A stand-in registered under a pickle global's name: calling it or giving it state stores nothing and
    runs nothing. torch.load(weights_only=True) with stand-ins reads past the objects a Lightning checkpoint
    keeps beside its tensors (callbacks, numpy scalars) without importing or running their code."""
    module, _, qualname = name.rpartition(".")
    return type(qualname, (), {"__module__": module, "__init__": lambda self, *a, **k: None,
                               "__setstate__": lambda self, state: None}), name


# The only globals a Lightning .ckpt (Stable Diffusion's sd-v1-4.ckpt, v1-5-pruned.ckpt) may name; any other
# global (os.system, a module's function) still stops torch.load(weights_only=True).
LIGHTNING_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                     "numpy.core.multiarray.scalar",
                     "numpy._core.multiarray.scalar", "numpy.dtype", "numpy.dtypes.Float64DType",
                     "numpy.dtypes.Float32DType", "numpy.dtypes.Int64DType", "_codecs.encode")


def read_torch_weights(path, flag="--weights"):
    """A .pt/.bin/.pth state dict (or a Lightning .ckpt's state_dict) through torch.load(weights_only=True):
    tensors and plain data, never code; LIGHTNING_GLOBALS load as inert stand-ins. Memory-mapped where the
    file allows it (zip files, the format of torch.save since PyTorch 1.6)."""
    try:
        try:
            with torch.serialization.safe_globals([inert(n) for n in LIGHTNING_GLOBALS]):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            with torch.serialization.safe_globals([inert(n) for n in LIGHTNING_GLOBALS]):
                obj = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        what = [line.strip() for line in ANSI.sub("", str(e)).splitlines() if "GLOBAL" in line]
        raise UserError(f"{flag} {path} " + (f"holds more than tensors and plain data; refused to load it "
                                                f"(weights_only=True): {what[0]}" if what else
                                                describe_unreadable(path, e)))
    except Exception as e:
        raise UserError(f"{flag} {path} {describe_unreadable(path, e)}")
    if isinstance(obj, dict) and "script" in obj and "config" in obj:
        raise UserError(f"{flag} {path} is a {obj['script']}.py checkpoint of this repository; pass it "
                        "with --ckpt")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{flag} {path}: not a state dict (a dict of tensors) but a {type(obj).__name__}")
    return obj


WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # diffusers' names


def read_weights(path, flag="--weights"):
    """--weights PATH -> (tensors {name: tensor}, config, folder). PATH is a .safetensors file, a
    .pt/.bin/.pth state dict, or a diffusers model folder (config.json and diffusion_pytorch_model.safetensors
    or .bin, at its top or in unet/). config is the config.json beside the weights file ({} if none)."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file or folder (nothing is downloaded here; see the "
                        "README's 'Released weights')")
    file = path
    if os.path.isdir(path):
        found = [os.path.join(d, f) for d in (path, os.path.join(path, "unet")) for f in WEIGHT_FILES
                 if os.path.isfile(os.path.join(d, f))]
        if not found:
            raise UserError(f"{flag} {path}: a folder without {' or '.join(WEIGHT_FILES)} (at its top or in "
                            "unet/); give the weights file itself or a diffusers model folder")
        file = found[0]                                            # .safetensors first
    with open(file, "rb") as f:
        head = f.read(9)
    safetensors = file.endswith(".safetensors") or (len(head) == 9 and head[8:9] == b"{")
    tensors = read_safetensors(file, flag) if safetensors else read_torch_weights(file, flag)
    folder = os.path.dirname(os.path.abspath(file))
    return tensors, read_json(os.path.join(folder, "config.json"), f"{flag} {path}: "), folder


def read_json(path, what=""):
    """A JSON file's content, {} where there is no such file; UserError where it is not JSON (`what` prefixes
    the message)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{what}{path} is not valid JSON ({e})")


# What a state dict is, told from its tensor names: (layout, in words, the script that loads it)
LAYOUTS = {"diffusers-unet": ("a diffusers UNet2DModel (DDPM's U-Net)", "ddpm.py or ddim.py"),
           "openai-unet": ("an OpenAI U-Net (guided-diffusion / improved-diffusion)", "guided.py --weights"),
           "openai-classifier": ("a guided-diffusion noise-aware classifier",
                                 "guided.py --classifier-weights"),
           "diffusers-unet-cond": ("a diffusers UNet2DConditionModel (Stable Diffusion's U-Net)",
                                   "ldm.py --weights, given the whole diffusers folder"),
           "compvis": ("a CompVis latent-diffusion / Stable Diffusion checkpoint", "ldm.py --weights"),
           "vae": ("an autoencoder (VAE)", None), "clip-text": ("a CLIP text encoder", None),
           "inception": ("the FID Inception network", "--eval --fid-weights"),
           "nano-unet": ("a bare state dict of this repository's U-Net", "--ckpt, as a whole checkpoint")}


def weights_layout(tensors):
    """The layout of a state dict, from its tensor names (never from the file name): a LAYOUTS key or
    'unknown'."""
    keys = set(tensors)
    has = lambda *names: all(k in keys for k in names)
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys):
        return "compvis"
    if has("time_embedding.linear_1.weight", "conv_in.weight"):
        cross = any(".transformer_blocks." in k or ".attn2." in k for k in keys)
        return "diffusers-unet-cond" if cross else "diffusers-unet"
    if has("time_embed.0.weight", "input_blocks.0.0.weight"):
        if has("out.2.positional_embedding"):
            return "openai-classifier"
        return "openai-unet" if any(k.startswith("output_blocks.") for k in keys) else "unknown"
    if has("encoder.conv_in.weight", "decoder.conv_in.weight"):
        return "vae"
    if any("token_embedding" in k for k in keys):
        return "clip-text"
    if has("Mixed_7c.branch_pool.conv.weight"):
        return "inception"
    if has("time_mlp.0.weight", "conv_in.weight"):
        return "nano-unet"
    return "unknown"


def check_layout(path, tensors, accepted, script, flag="--weights"):
    """UserError, in one line, unless the tensors have one of the `accepted` layouts: what was found (and
    which script loads it) and what `script` accepts."""
    layout = weights_layout(tensors)
    if layout in accepted:
        return layout
    if layout == "unknown":
        found = f"an unknown layout ({len(tensors)} tensors, e.g. {', '.join(sorted(tensors)[:3])})"
    else:
        words, user = LAYOUTS[layout]
        found = words + (f", which {user} loads" if user else ", which no script here loads yet")
    want = " or ".join(LAYOUTS[a][0] for a in accepted)
    raise UserError(f"{flag} {path}: found {found}; {script}.py {flag} loads {want}")


@contextmanager
def complete(path, flag="--weights"):
    """Reading a layout's tensors: a missing one is a file that is not whole (or not that model), one line."""
    try:
        yield
    except KeyError as e:
        raise UserError(f"{flag} {path}: it has no tensor {e}, which its layout has; an incomplete or edited "
                        "file?")


def check_mapping(model, tensors):
    """How renamed tensors fit a model: (missing, unexpected, wrongly shaped) key lists, all empty when every
    key is mapped, every shape equal and nothing left over. Works on the meta device (no memory)."""
    want = model.state_dict()
    missing = [k for k in want if k not in tensors]
    extra = [k for k in tensors if k not in want]
    bad = [k for k in want if k in tensors and tuple(tensors[k].shape) != tuple(want[k].shape)]
    return missing, extra, bad


def load_mapped(model, tensors, path, flag="--weights"):
    """Load renamed released tensors into our model strictly, or one UserError naming the first misfit."""
    missing, extra, bad = check_mapping(model, tensors)
    if missing or extra or bad:
        first = (missing + extra + bad)[0]
        raise UserError(f"{flag} {path}: its tensors do not fit the network they describe ({len(missing)} "
                        f"missing, {len(extra)} unexpected, {len(bad)} wrongly shaped, e.g. {first}); check "
                        "the override flags against the model's released configuration")
    model.load_state_dict(tensors)
    return model


# DDPM (Ho et al. 2020) as ported to diffusers: the UNet2DModel layout of the google/ddpm-* folders.

# block widths -> (the google/ddpm-* model, image size), for weights given without their config.json
DDPM_RELEASED = {
    (128, 256, 256, 256): ("google/ddpm-cifar10-32", 32),
    (128, 128, 256, 256, 512, 512): ("google/ddpm-celebahq-256 / -church-256 / -bedroom-256 / -cat-256", 256),
}
# UNet2DModel's config: what UNet can match (key: the values it accepts, the first is diffusers' default)
DIFFUSERS_ACCEPTS = {"act_fn": ("silu",), "time_embedding_type": ("positional",),
                     "center_input_sample": (False,), "resnet_time_scale_shift": ("default",),
                     "add_attention": (True,), "class_embed_type": (None,), "num_class_embeds": (None,),
                     "mid_block_scale_factor": (1,), "time_embedding_dim": (None,),
                     "mid_block_type": ("UNetMidBlock2D",), "downsample_type": ("conv",),
                     "upsample_type": ("conv",), "attn_norm_num_groups": (None,),
                     "downsample_padding": (1, 0)}


def ddpm_released_config(tensors, path):
    """The config.json of the google/ddpm-* model whose block widths the tensors show, for weights given
    without it. The settings no tensor shows are those of DDPM's TensorFlow code: frequencies over half - 1,
    [sin, cos], right/bottom padding, GroupNorm with 32 groups and eps 1e-6, one attention head."""
    count = lambda pattern: len({m[1] for k in tensors for m in [re.match(pattern, k)] if m})
    levels = count(r"down_blocks\.(\d+)\.")
    widths = tuple(tensors[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels))
    if widths not in DDPM_RELEASED:
        known = ", ".join(str(list(w)) for w in DDPM_RELEASED)
        raise UserError(f"--weights {path}: a UNet2DModel with block widths {list(widths)} and no "
                        "config.json beside it; put its config.json there (the released google/ddpm-* "
                        f"models: {known})")
    name, size = DDPM_RELEASED[widths]
    attn = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in tensors) for i in range(levels)]
    return {"_name": name, "sample_size": size, "block_out_channels": list(widths),
            "layers_per_block": count(r"down_blocks\.0\.resnets\.(\d+)\."),
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            "in_channels": tensors["conv_in.weight"].shape[1],
            "out_channels": tensors["conv_out.weight"].shape[0],
            "freq_shift": 1, "flip_sin_to_cos": False, "norm_eps": 1e-6, "norm_num_groups": 32,
            "downsample_padding": 0, "attention_head_dim": None}


def unet_config_from_diffusers(config, path):
    """common.UNet's settings for a diffusers UNet2DModel config.json; UserError for what it cannot match."""
    for key, ok in DIFFUSERS_ACCEPTS.items():
        if config.get(key, ok[0]) not in ok:
            raise UserError(f"--weights {path}: a UNet2DModel with {key} = {config[key]!r}; common.UNet "
                            f"matches only {' or '.join(map(repr, ok))}")
    down, up = config["down_block_types"], config["up_block_types"]
    attn = [t == "AttnDownBlock2D" for t in down]
    if not set(down) <= {"DownBlock2D", "AttnDownBlock2D"} or up != [
            "AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]:
        raise UserError(f"--weights {path}: blocks {down} / {up}; common.UNet has DownBlock2D and "
                        "AttnDownBlock2D with the mirrored up blocks")
    widths, size = config["block_out_channels"], config.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    ch = widths[0]
    if any(w % ch for w in widths) or not isinstance(size, int):
        raise UserError(f"--weights {path}: block widths {widths} and sample size {size}; common.UNet needs "
                        "multiples of the first width and a square image")
    head_dim = config.get("attention_head_dim", 8)
    return dict(image_size=size, channels=config.get("in_channels", 3), out_ch=config.get("out_channels", 3),
                ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=config.get("layers_per_block", 2),
                attn_res=[size >> i for i, a in enumerate(attn) if a], heads=1 if head_dim is None else None,
                head_channels=head_dim, dropout=0.0, norm_groups=config.get("norm_num_groups", 32),
                norm_eps=config.get("norm_eps", 1e-5), emb_shift=config.get("freq_shift", 0),
                emb_cos_first=config.get("flip_sin_to_cos", True),
                tf_pad=config.get("downsample_padding", 1) == 0)


def unet_from_diffusers(tensors, num_res_blocks):
    """diffusers UNet2DModel names -> common.UNet names. Level L's j-th residual block is entry L (n + 1) + j
    of our down (and up) list, n = num_res_blocks; its attention sits beside it; the resampler ends the
    level. Older uploads name the attention query/key/value/proj_attn; k and v fuse into our kv projection."""
    n = num_res_blocks + 1
    attn_up = {m[1] for k in tensors for m in [re.match(r"up_blocks\.(\d+)\.attentions\.", k)] if m}
    at = lambda side, level, j, slot: f"{side}.{int(level) * n + int(j)}.{slot}."
    names = [(r"^time_embedding\.linear_(\d)\.", lambda m: f"time_mlp.{2 * int(m[1]) - 2}."),
             (r"^conv_norm_out\.", "out.0."), (r"^conv_out\.", "out.2."),
             (r"^(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: at(m[1], m[2], m[3], 0)),
             (r"^(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: at(m[1], m[2], m[3], 1)),
             (r"^down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: at("down", m[1], n - 1, 0)),
             (r"^up_blocks\.(\d+)\.upsamplers\.0\.",
              lambda m: at("up", m[1], n - 1, 2 if m[1] in attn_up else 1)),
             (r"^mid_block\.resnets\.(\d)\.", lambda m: f"mid.{2 * int(m[1])}."),
             (r"^mid_block\.attentions\.0\.", "mid.1."),
             (r"\.time_emb_proj\.", ".emb."), (r"\.conv_shortcut\.", ".skip."), (r"\.group_norm\.", ".norm."),
             (r"\.(to_q|query)\.", ".attn.q."), (r"\.(to_out\.0|proj_attn)\.", ".attn.out."),
             (r"\.(to_k|key)\.", ".attn.k."), (r"\.(to_v|value)\.", ".attn.v.")]
    out = {}
    for key, v in tensors.items():
        for pattern, repl in names:
            key = re.sub(pattern, repl, key)
        out[key] = v
    for key in [k for k in out if ".attn.k." in k]:                     # k and v rows -> our kv projection
        k, v = out.pop(key), out.pop(key.replace(".k.", ".v."))
        out[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([k, v])
    return out


# Ho et al. 2020, Sec. 4 and Appendix B (sigma_t^2 = beta_t, the official CIFAR-10 sampler's)
DDPM_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                 "variance_type": "fixed_large", "prediction_type": "epsilon"}


def diffusion_config_from_diffusers(sched, path):
    """The diffusion settings of a diffusers DDPMScheduler config (DDPM_SCHEDULE where there is none)."""
    s = {**DDPM_SCHEDULE, **sched}
    names = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
    var = {"fixed_large": "large", "fixed_small": "small"}
    objective = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
    if s["beta_schedule"] not in names or s.get("trained_betas") or s["variance_type"] not in var \
            or s["prediction_type"] not in objective:
        raise UserError(f"--weights {path}: scheduler {s['beta_schedule']} betas, {s['variance_type']} "
                        f"variance, {s['prediction_type']} prediction; this script has linear/scaled_linear/"
                        "squaredcos_cap_v2, fixed_large/fixed_small and epsilon/sample/v_prediction")
    return dict(timesteps=s["num_train_timesteps"], schedule=names[s["beta_schedule"]],
                beta_start=s["beta_start"], beta_end=s["beta_end"], var=var[s["variance_type"]],
                objective=objective[s["prediction_type"]])


def check_weights_flags(args):
    """--weights replaces --ckpt, for --sample and --eval."""
    if args.weights and (args.train or args.resume):
        raise UserError("--weights loads a released model to --sample or --eval; --train starts from scratch")
    if args.weights and args.ckpt:
        raise UserError("give --weights or --ckpt, not both")


def load_diffusers_ddpm(path, script):
    """--weights for ddpm.py and ddim.py: a diffusers UNet2DModel (file or folder) -> (config, tensors renamed
    for common.UNet, what it is). The config holds the network's settings (its config.json, else
    DDPM_RELEASED's) and the diffusion's (scheduler_config.json beside it or in ../scheduler, else
    DDPM_SCHEDULE)."""
    tensors, config, folder = read_weights(path)
    check_layout(path, tensors, ["diffusers-unet"], script)
    what = config.get("_name_or_path") or folder
    if not config:
        with complete(path):
            config = ddpm_released_config(tensors, path)
        what = config["_name"] + " (settings from its released configuration)"
    beside = [os.path.join(folder, "scheduler_config.json"),
              os.path.join(folder, "..", "scheduler", "scheduler_config.json")]
    found = [p for p in beside if os.path.isfile(p)]
    sched = read_json(found[0], f"--weights {path}: ") if found else {}
    cfg = {**unet_config_from_diffusers(config, path), **diffusion_config_from_diffusers(sched, path)}
    return cfg, unet_from_diffusers(tensors, cfg["num_res_blocks"]), what


def load_released_ddpm(args, script):
    """--weights of ddpm.py and ddim.py -> (config, common.UNet with DDPM's released weights, on the CPU, what
    it is); --image-size runs the same network at another size."""
    cfg, tensors, what = load_diffusers_ddpm(args.weights, script)
    if args.image_size:
        cfg = resize_unet(cfg, args.image_size)
        check_unet_size(cfg)
    return cfg, load_mapped(build_unet(cfg), tensors, args.weights), what


# OpenAI's U-Net (improved-diffusion, Nichol & Dhariwal 2021; guided-diffusion, Dhariwal & Nichol 2021)

OPENAI_BLOCK_NAMES = [(r"\.in_layers\.0\.", ".norm1."), (r"\.in_layers\.2\.", ".conv1."),
                      (r"\.emb_layers\.1\.", ".emb."), (r"\.out_layers\.0\.", ".norm2."),
                      (r"\.out_layers\.3\.", ".conv2."), (r"\.skip_connection\.", ".skip."),
                      (r"\.op\.", ".conv."), (r"\.proj_out\.", ".attn.out.")]      # op: Downsample's conv
OPENAI_UNET_NAMES = [(r"^time_embed\.", "time_mlp."), (r"^label_emb\.", "class_emb."),
                     (r"^input_blocks\.0\.0\.", "conv_in."),
                     (r"^input_blocks\.(\d+)\.", lambda m: f"down.{int(m[1]) - 1}."),
                     (r"^middle_block\.", "mid."), (r"^output_blocks\.", "up.")]


def split_qkv(w, heads, order):
    """A fused qkv projection (3C rows) -> our q (C rows) and kv (2C rows: k then v), rows [head][channel].
    The 'new' order (QKVAttention: q, k, v, then the heads) is ours already; 'legacy' (QKVAttentionLegacy: the
    heads, then q, k, v inside each) swaps the head and q/k/v axes."""
    C = w.shape[0] // 3
    if order == "legacy":
        w = w.reshape(heads, 3, C // heads, *w.shape[1:]).transpose(0, 1).reshape(w.shape)
    elif order != "new":
        raise UserError(f"qkv order '{order}': use legacy or new")
    return w[:C], w[C:]


def openai_to_ours(tensors, names, heads_of, qkv_order):
    """The renaming shared by OpenAI's U-Net and classifier: `names` turn the block names into ours and
    OPENAI_BLOCK_NAMES the layers inside them; each fused qkv is split (split_qkv with heads_of(C) heads), and
    the 1x1 Conv1d weights over the tokens lose their kernel axis to become the Linear weights they are."""
    out = {}
    for key, v in tensors.items():
        new = key
        for pattern, repl in names + OPENAI_BLOCK_NAMES:
            new = re.sub(pattern, repl, new)
        v = v[..., 0] if v.ndim == 3 else v
        if re.search(r"\.qkv\.(weight|bias)$", key):
            base, kind = new.rsplit(".qkv.", 1)
            q, kv = split_qkv(v, heads_of(v.shape[0] // 3), qkv_order)
            out[f"{base}.attn.q.{kind}"], out[f"{base}.attn.kv.{kind}"] = q, kv
        else:
            out[new] = v
    return out


def unet_from_openai(tensors, heads_of, qkv_order):
    """OpenAI U-Net names -> common.UNet names: input_blocks[1:] are our down list, middle_block our mid,
    output_blocks our up list, block for block (the same order of the same blocks)."""
    return openai_to_ours(tensors, OPENAI_UNET_NAMES, heads_of, qkv_order)


def openai_unet_structure(tensors, path):
    """The settings an OpenAI U-Net's tensors show: base width, multipliers, blocks per level, the levels
    with attention (0 = full size), classes, in/out channels, AdaGN, BigGAN up/down. Image size, heads, qkv
    order and the diffusion are not in the tensors."""
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)})
    ch = tensors["time_embed.0.weight"].shape[1]
    n_out = count("output_blocks.")
    resamples = [i for i in range(n_out) for j in (1, 2) if f"output_blocks.{i}.{j}.conv.weight" in tensors
                 or f"output_blocks.{i}.{j}.in_layers.0.weight" in tensors]
    n = resamples[0] if resamples else n_out - 1                       # residual blocks per level
    levels = n_out // (n + 1)
    first = lambda level: f"input_blocks.{1 + level * (n + 1)}."
    widths = [tensors[first(level) + "0.out_layers.3.weight"].shape[0] for level in range(levels)]
    if any(w % ch for w in widths) or tensors["input_blocks.0.0.weight"].shape[0] != ch:
        raise UserError(f"--weights {path}: widths {widths} for base width {ch}; common.UNet needs whole "
                        "multipliers starting at 1 (the 512x512 model's 0.5 is not supported)")
    emb = tensors["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    return dict(ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=n,
                attn_levels=[lv for lv in range(levels) if first(lv) + "1.qkv.weight" in tensors],
                num_classes=tensors["label_emb.weight"].shape[0] if "label_emb.weight" in tensors else None,
                channels=tensors["input_blocks.0.0.weight"].shape[1], out_ch=tensors["out.2.weight"].shape[0],
                scale_shift=emb == 2 * widths[0],
                resblock_updown=f"input_blocks.{n + 1}.0.in_layers.0.weight" in tensors)

# What the released models' tensors do not show (guided.py --weights), from the two repositories' READMEs,
# keyed by what they do show (openai_unet_structure): base width, multipliers, residual blocks per level, the
# levels with attention (0 = full size), classes, BigGAN up/down. qkv: the fused attention's order
# (split_qkv); rescale: the network takes t * 1000 / T (IDDPM's rescale_timesteps); scale, steps: the
# README's guidance scale and respaced steps.
ADM_256 = dict(image_size=256, head_channels=64, qkv="legacy", schedule="linear", timesteps=1000, steps=250)
IDDPM = dict(qkv="legacy", heads=4, schedule="cosine", timesteps=4000, rescale=True)
OPENAI_RELEASED = {
    (192, (1, 2, 3, 4), 3, (1, 2, 3), 1000, True): dict(
        files="64x64_diffusion.pt", image_size=64, head_channels=64, qkv="new", schedule="cosine",
        timesteps=1000, scale=1.0, steps=250),
    (256, (1, 1, 2, 3, 4), 2, (2, 3, 4), 1000, True): dict(
        files="128x128_diffusion.pt", image_size=128, heads=4, qkv="legacy", schedule="linear",
        timesteps=1000, scale=0.5, steps=250),
    (256, (1, 1, 2, 2, 4, 4), 2, (3, 4, 5), 1000, True): dict(
        files="256x256_diffusion.pt", scale=1.0, **ADM_256),
    (256, (1, 1, 2, 2, 4, 4), 2, (3, 4, 5), None, True): dict(
        files="256x256_diffusion_uncond.pt, lsun_bedroom/cat/horse(_nodropout).pt", scale=10.0, **ADM_256),
    (128, (1, 2, 2, 2), 3, (1, 2), None, False): dict(
        files="cifar10_uncond_50M_500K.pt, cifar10_uncond_vlb_50M_500K.pt", image_size=32, **IDDPM),
    (128, (1, 2, 3, 4), 3, (2, 3), None, False): dict(
        files="imagenet64_uncond_100M_1500K.pt, imagenet64_uncond_vlb_100M_1500K.pt", image_size=64, **IDDPM),
    (192, (1, 2, 3, 4), 3, (2, 3), 1000, False): dict(
        files="imagenet64_cond_270M_250K.pt", image_size=64, **{**IDDPM, "rescale": False}),
    (128, (1, 1, 2, 2, 4, 4), 2, (4,), None, False): dict(
        files="lsun_uncond_100M_1200K_bs128.pt, lsun_uncond_100M_2400K_bs64.pt", image_size=256, heads=1,
        qkv="legacy", schedule="linear", timesteps=1000),
}
# ADM's classifiers (create_classifier: width 128, 64 channels per head, attention at 32, 16 and 8 pixels,
# the multipliers fixed by the image size), keyed by (width, number of input blocks); trained with T = 1000.
OPENAI_CLASSIFIERS = {
    (128, 20): dict(files="64x64_classifier.pt", image_size=64, ch_mult=[1, 2, 3, 4], depth=4),
    (128, 15): dict(files="128x128_classifier.pt", image_size=128, ch_mult=[1, 1, 2, 3, 4], depth=2),
    (128, 18): dict(files="256x256_classifier.pt", image_size=256, ch_mult=[1, 1, 2, 2, 4, 4], depth=2),
}




def openai_released_config(s, args, path):
    """An OpenAI U-Net's config: the structure `s` its tensors show, the OPENAI_RELEASED entry it matches,
    then guided.py's override flags (--image-size, --heads/--head-channels, --qkv-order, --schedule,
    --timesteps, --rescale-timesteps). UserError naming the flags still needed for a model that is none of
    the released ones."""
    key = (s["ch"], tuple(s["ch_mult"]), s["num_res_blocks"], tuple(s["attn_levels"]), s["num_classes"],
           s["resblock_updown"])
    r = dict(OPENAI_RELEASED.get(key, {}))
    if args.heads or args.head_channels:
        r.pop("heads", None)
        r.pop("head_channels", None)
    flags = dict(image_size=args.image_size, heads=args.heads, head_channels=args.head_channels,
                 qkv=args.qkv_order, schedule=args.schedule, timesteps=args.timesteps,
                 rescale={"yes": True, "no": False}.get(args.rescale_timesteps))
    r.update({k: v for k, v in flags.items() if v is not None})
    need = [flag for flag, have in (("--image-size", "image_size" in r), ("--qkv-order", "qkv" in r),
                                    ("--heads or --head-channels", "heads" in r or "head_channels" in r),
                                    ("--schedule", "schedule" in r), ("--timesteps", "timesteps" in r))
            if not have]
    if need:
        raise UserError(f"--weights {path}: an OpenAI U-Net that is none of the released ones (width "
                        f"{s['ch']}, multipliers {s['ch_mult']}, {s['num_res_blocks']} blocks per level); "
                        f"give {', '.join(need)}")
    widths = [s["ch"] * s["ch_mult"][level] for level in s["attn_levels"]] + [s["ch"] * s["ch_mult"][-1]]
    split = r.get("head_channels") or r["heads"]
    if any(w % split for w in widths):
        what = f"heads of {split} channels" if r.get("head_channels") else f"{split} heads"
        raise UserError(f"--weights {path}: attention widths {widths} do not split into {what}")
    return dict(image_size=r["image_size"], channels=s["channels"], out_ch=s["out_ch"], ch=s["ch"],
                ch_mult=s["ch_mult"], num_res_blocks=s["num_res_blocks"],
                attn_res=[r["image_size"] >> level for level in s["attn_levels"]], heads=r.get("heads"),
                head_channels=r.get("head_channels"), num_classes=s["num_classes"], null_label=False,
                scale_shift=s["scale_shift"], resblock_updown=s["resblock_updown"], norm_groups=32,
                emb_cos_first=True, timesteps=r["timesteps"], schedule=r["schedule"],
                var="learned" if s["out_ch"] == 2 * s["channels"] else "large", qkv=r["qkv"],
                rescale_timesteps=r.get("rescale", False), released=r.get("files"),
                guidance_scale=r.get("scale"), sample_steps=r.get("steps"))


def load_openai_unet(args):
    """guided.py --weights: a released ADM or Improved DDPM model -> (config, common.UNet with its weights, on
    the CPU)."""
    path = args.weights
    tensors = read_weights(path)[0]
    check_layout(path, tensors, ["openai-unet"], "guided")
    with complete(path):
        cfg = openai_released_config(openai_unet_structure(tensors, path), args, path)
    check_unet_size(cfg)

    def heads_of(width):
        return width // cfg["head_channels"] if cfg["head_channels"] else cfg["heads"]
    return cfg, load_mapped(build_unet(cfg), unet_from_openai(tensors, heads_of, cfg["qkv"]), path)


def add_openai_flags(p):
    """guided.py's flags for OpenAI's released files: a classifier to guide with, and the settings of a U-Net
    that its tensors do not show (openai_released_config reads them)."""
    p.add_argument("--classifier-weights", metavar="PATH", goes_with="--sample or --eval",
                   excludes="--classifier", help="a released ADM classifier (64x64_classifier.pt, "
                   "128x128_classifier.pt, 256x256_classifier.pt) to guide with; with --weights the default "
                   "--scale is then the README's (1, 0.5, 1; 10 for the unconditional 256x256 model), else 0")
    p.add_argument("--heads", type=positive_int, goes_with="--weights", excludes="--head-channels",
                   help="attention heads (default: the released model's)")
    p.add_argument("--head-channels", type=positive_int, goes_with="--weights",
                   help="channels per attention head instead of --heads")
    p.add_argument("--qkv-order", choices=["legacy", "new"], goes_with="--weights",
                   help="the fused qkv's order: legacy (heads, then q/k/v) or new (q/k/v, then heads); "
                        "default: the released model's")
    p.add_argument("--timesteps", type=positive_int, goes_with="--weights", help="the number of "
                   "diffusion steps T the model was trained with (default: the released model's)")
    p.add_argument("--rescale-timesteps", choices=["yes", "no"], goes_with="--weights", help="the network "
                   "takes t * 1000 / T (Improved DDPM's models: yes; default: the released model's)")


def classifier_from_openai(tensors, heads_of):
    """guided-diffusion classifier names (EncoderUNetModel) -> guided.Classifier names: input_blocks[1:] and
    middle_block are its blocks, module for module in order; out.0 is out_norm, out.2 the attention pool,
    whose fused qkv is already in our order ('new') and whose position table is stored transposed."""
    found = [re.match(r"input_blocks\.(\d+)\.(\d+)\.", k) for k in tensors]
    trunk = sorted({(int(m[1]), int(m[2])) for m in found if m and m[1] != "0"})
    index = {f"input_blocks.{n}.{j}.": f"blocks.{i}." for i, (n, j) in enumerate(trunk)}
    index.update({f"middle_block.{j}.": f"blocks.{len(trunk) + j}." for j in range(3)})
    names = [(r"^time_embed\.", "time_mlp."), (r"^input_blocks\.0\.0\.", "conv_in."),
             (r"^(input_blocks\.\d+\.\d+\.|middle_block\.\d\.)", lambda m: index[m[1]]),
             (r"^out\.0\.", "out_norm."), (r"^out\.2\.qkv_proj\.", "pool.qkv."),
             (r"^out\.2\.c_proj\.", "pool.proj."), (r"^out\.2\.positional_embedding$", "pool.pos")]
    out = openai_to_ours(tensors, names, heads_of, "legacy")
    out["pool.pos"] = out["pool.pos"].t()                                   # (C, HW + 1) -> (HW + 1, C)
    return out


def load_openai_classifier(path, T, image_size, build):
    """guided.py --classifier-weights: one of ADM's released classifiers -> (config, build(config) with its
    weights, on the CPU), for a diffusion model of T steps making image_size images."""
    flag = "--classifier-weights"
    tensors = read_weights(path, flag)[0]
    check_layout(path, tensors, ["openai-classifier"], "guided", flag)
    with complete(path, flag):
        width, classes = tensors["time_embed.0.weight"].shape[1], tensors["out.2.c_proj.weight"].shape[0]
    blocks = len({k.split(".")[1] for k in tensors if k.startswith("input_blocks.")})
    r = OPENAI_CLASSIFIERS.get((width, blocks))
    if r is None:
        known = ", ".join(c["files"] for c in OPENAI_CLASSIFIERS.values())
        raise UserError(f"{flag} {path}: a classifier of width {width} with {blocks} input blocks, none of "
                        f"{known}")
    if (r["image_size"], 1000) != (image_size, T):
        raise UserError(f"{flag} {path}: {r['files']} judges {r['image_size']}px images at T = 1000; the "
                        f"diffusion model makes {image_size}px images with T = {T}")
    ccfg = dict(num_classes=classes, ch=width, ch_mult=r["ch_mult"], depth=r["depth"], attn_res=[32, 16, 8],
                head_channels=64, image_size=image_size, channels=tensors["input_blocks.0.0.weight"].shape[1],
                timesteps=1000, norm_groups=32, emb_cos_first=True, released=r["files"])
    return ccfg, load_mapped(build(ccfg), classifier_from_openai(tensors, lambda c: c // 64), path, flag)


# Stable Diffusion v1 (Rombach et al. 2022, the text-to-image model of Sec. 4.3 as released by CompVis and
# Stability AI) -> common.LDM, common.AutoencoderKL and ClipTokenizer. One CompVis file holds all three
# networks under the prefixes below; a diffusers folder keeps them in unet/, vae/, text_encoder/ and
# tokenizer/.

# What no tensor shows: the released v1 configuration (v1-inference.yaml) and sampling settings
SD_V1 = dict(cond="text", text="clip", image_size=512, channels=3, f=8, heads=8, norm_groups=32, ae_groups=32,
             emb_cos_first=True, dropout=0.0, timesteps=1000, schedule="scaled_linear", beta_start=0.00085,
             beta_end=0.012, scale_factor=0.18215, ddim_offset=1)
SD_PREFIXES = {"unet": "model.diffusion_model.", "ae": "first_stage_model.",
               "text": "cond_stage_model.transformer."}
TRANSFORMER_NAMES = [(r"\.transformer_blocks\.0\.", "."), (r"\.(attn[12])\.to_(q|k|v)\.", r".\1.\2."),
                     (r"\.(attn[12])\.to_out\.0\.", r".\1.out."), (r"\.ff\.net\.0\.", ".ff.0."),
                     (r"\.ff\.net\.2\.", ".ff.1.")]
AE_COMPVIS_NAMES = [(r"\.nin_shortcut\.", ".skip."), (r"\.(down|up)sample\.", ".resample."),
                    (r"\.mid\.block_1\.", ".mid.0."), (r"\.mid\.attn_1\.", ".mid.1."),
                    (r"\.mid\.block_2\.", ".mid.2."), (r"\.mid\.1\.(q|k|v)\.", r".mid.1.attn.\1."),
                    (r"\.mid\.1\.proj_out\.", ".mid.1.attn.out.")]
AE_DIFFUSERS_NAMES = [(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
                      (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.resample."),
                      (r"\.mid_block\.resnets\.0\.", ".mid.0."), (r"\.mid_block\.attentions\.0\.", ".mid.1."),
                      (r"\.mid_block\.resnets\.1\.", ".mid.2."), (r"\.conv_shortcut\.", ".skip."),
                      (r"\.conv_norm_out\.", ".norm_out."), (r"\.mid\.1\.group_norm\.", ".mid.1.norm."),
                      (r"\.mid\.1\.(to_q|query)\.", ".mid.1.attn.q."),
                      (r"\.mid\.1\.(to_k|key)\.", ".mid.1.attn.k."),
                      (r"\.mid\.1\.(to_v|value)\.", ".mid.1.attn.v."),
                      (r"\.mid\.1\.(to_out\.0|proj_attn)\.", ".mid.1.attn.out.")]
CLIP_NAMES = [(r"^(cond_stage_model\.transformer\.)?(text_model\.)?", ""),
              (r"^embeddings\.token_embedding\.", "tok."),
              (r"^embeddings\.position_embedding\.weight", "pos"),
              (r"^encoder\.layers\.", "blocks."), (r"\.self_attn\.(q|k|v)_proj\.", r".attn.\1."),
              (r"\.self_attn\.out_proj\.", ".attn.out."), (r"\.layer_norm(\d)\.", r".ln\1."),
              (r"\.mlp\.fc1\.", ".ff.0."), (r"\.mlp\.fc2\.", ".ff.2."), (r"^final_layer_norm\.", "ln.")]


def rename(tensors, names):
    """Apply the (pattern, replacement) renamings in order to every tensor name."""
    out = {}
    for key, v in tensors.items():
        for pattern, repl in names:
            key = re.sub(pattern, repl, key)
        out[key] = v
    return out


def fuse_kv(tensors):
    """Separate k and v projections -> our one kv projection (k rows, then v rows); 1x1 conv weights of the
    autoencoder's attention lose their kernel axes to become the Linear weights they are."""
    out = {k: v[..., 0, 0] if v.ndim == 4 and re.search(r"\.attn\.(q|k|v|out)\.weight$", k) else v
           for k, v in tensors.items()}
    for key in [k for k in out if re.search(r"\.k\.(weight|bias)$", k)]:
        k, v = out.pop(key), out.pop(key[:-len("k.weight")] + "v.weight" if key.endswith("weight") else
                                      key[:-len("k.bias")] + "v.bias")
        out[re.sub(r"\.k\.(weight|bias)$", r".kv.\1", key)] = torch.cat([k, v])
    return out


def unet_from_sd(tensors, layout):
    """Stable Diffusion's U-Net (CompVis: OpenAI's layout; or diffusers' UNet2DConditionModel) -> common.UNet:
    the residual blocks and resamplers are renamed as for DDPM and ADM; each SpatialTransformer's one
    transformer block is flattened into it (norm1..3, attn1, attn2, ff as released)."""
    t = rename(tensors, TRANSFORMER_NAMES)
    if layout == "compvis":
        t = rename(t, OPENAI_UNET_NAMES + [n for n in OPENAI_BLOCK_NAMES if "proj_out" not in n[0]])
    else:
        t = unet_from_diffusers(t, count(t, "down_blocks.0.resnets."))
    return fuse_kv(t)


def ae_from_sd(tensors, layout):
    """The released KL autoencoder (CompVis or diffusers AutoencoderKL) -> common.AutoencoderKL. diffusers
    numbers the decoder's levels from the lowest resolution, CompVis (and we) from the full size."""
    if layout == "compvis":
        return fuse_kv(rename(tensors, AE_COMPVIS_NAMES))
    top = len({k.split(".")[2] for k in tensors if k.startswith("encoder.down_blocks.")}) - 1
    names = AE_DIFFUSERS_NAMES + [
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{top - int(m[1])}.block."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{top - int(m[1])}.resample.")]
    return fuse_kv(rename(tensors, names))


def text_from_clip(tensors):
    """transformers' CLIPTextModel names (with or without text_model., under CompVis' cond_stage_model.
    transformer.) -> common.TextEncoder; position_ids is a buffer of constants, not a weight."""
    t = rename({k: v for k, v in tensors.items() if not k.endswith("position_ids")}, CLIP_NAMES)
    return fuse_kv(t)


def count(tensors, prefix):
    """How many numbered children prefix N. the tensor names show."""
    return len({k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)})


def sd_config(unet, ae, text, image_size, heads, text_heads):
    """LDM's config for renamed SD tensors: the sizes are read from the tensors, the rest is SD_V1's."""
    ch, n = unet["conv_in.weight"].shape[0], 0
    while f"down.{n}.0.conv1.weight" in unet:        # residual blocks of the first level, then its Downsample
        n += 1
    levels = (count(unet, "down.") + 1) // (n + 1)
    attn = [lv for lv in range(levels) if f"down.{lv * (n + 1)}.1.proj_in.weight" in unet]
    levels_ae = count(ae, "encoder.down.")
    ae_widths = [ae[f"encoder.down.{lv}.block.0.conv2.weight"].shape[0] for lv in range(levels_ae)]
    cfg = dict(SD_V1, image_size=image_size, f=2 ** (levels_ae - 1), z_ch=unet["conv_in.weight"].shape[1],
               ch=ch,
               ch_mult=[unet[f"down.{lv * (n + 1)}.0.conv2.weight"].shape[0] // ch for lv in range(levels)],
               num_res_blocks=n, heads=heads,
               context_dim=next(v.shape[1] for k, v in unet.items() if k.endswith("attn2.kv.weight")),
               ae_ch=ae_widths[0], ae_mult=[w // ae_widths[0] for w in ae_widths],
               ae_res_blocks=count(ae, "encoder.down.0.block."),
               channels=ae["encoder.conv_in.weight"].shape[1],
               vocab_size=text["tok.weight"].shape[0], text_layers=count(text, "blocks."),
               max_len=text["pos"].shape[0])
    latent = image_size // cfg["f"]
    text_heads = text_heads or max(1, text["pos"].shape[1] // 64)     # CLIP: one head per 64 channels
    return dict(cfg, attn_res=[latent >> lv for lv in attn], text_heads=text_heads)


def read_sd_folder(path):
    """A diffusers Stable Diffusion folder -> (unet, ae, text) tensors renamed for us, and the settings its
    config files give (heads, image size, latent scale, schedule)."""
    unet, ucfg, _ = read_weights(os.path.join(path, "unet"))
    ae, vcfg, _ = read_weights(os.path.join(path, "vae"))
    files = [os.path.join(path, "text_encoder", f) for f in ("model.safetensors", "pytorch_model.bin")]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise UserError(f"--weights {path}: no text_encoder/model.safetensors nor pytorch_model.bin")
    text = read_safetensors(files[0]) if files[0].endswith(".safetensors") else read_torch_weights(files[0])
    tcfg = read_json(os.path.join(path, "text_encoder", "config.json"))
    sched = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    if ucfg.get("use_linear_projection") or sched.get("prediction_type", "epsilon") != "epsilon":
        raise UserError(f"--weights {path}: a Stable Diffusion 2.x or v-prediction model; ldm.py loads v1.x")
    heads = ucfg.get("num_attention_heads") or ucfg.get("attention_head_dim", SD_V1["heads"])
    levels = len(vcfg.get("block_out_channels", [128, 256, 512, 512]))     # f = 2^(levels - 1)
    settings = dict(heads=heads, text_heads=tcfg.get("num_attention_heads"),
                    image_size=ucfg.get("sample_size", 64) * 2 ** (levels - 1),
                    scale_factor=vcfg.get("scaling_factor", SD_V1["scale_factor"]),
                    timesteps=sched.get("num_train_timesteps", 1000),
                    beta_start=sched.get("beta_start", 0.00085),
                    beta_end=sched.get("beta_end", 0.012), ddim_offset=sched.get("steps_offset", 1))
    if sched.get("beta_schedule", "scaled_linear") != "scaled_linear" or not isinstance(heads, int):
        raise UserError(f"--weights {path}: {sched.get('beta_schedule')} betas, heads {heads}; ldm.py loads "
                        "Stable Diffusion v1.x (scaled_linear betas, one head count)")
    return unet_from_sd(unet, "diffusers"), ae_from_sd(ae, "diffusers"), text_from_clip(text), settings


def read_sd_file(path):
    """A CompVis single file (.safetensors, or the Lightning .ckpt) -> (unet, ae, text) tensors renamed for
    us. The schedule buffers are left out (SD_V1 holds the schedule), and so are model_ema.* (full-EMA
    files: the released sampler uses model.diffusion_model, which in the pruned files is the EMA)."""
    tensors = read_weights(path)[0]
    check_layout(path, tensors, ["compvis"], "ldm")
    part = {name: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
            for name, p in SD_PREFIXES.items()}
    if not all(part.values()):
        missing = [SD_PREFIXES[n] + "*" for n, v in part.items() if not v]
        raise UserError(f"--weights {path}: no {', '.join(missing)} tensors; a Stable Diffusion v1 file "
                        "holds the U-Net, the autoencoder and the CLIP text encoder")
    return unet_from_sd(part["unet"], "compvis"), ae_from_sd(part["ae"], "compvis"), text_from_clip(
        {SD_PREFIXES["text"] + k: v for k, v in part["text"].items()}), {}


def load_stable_diffusion(path, tokenizer=None, image_size=None):
    """--weights PATH (a CompVis file or a diffusers folder) and --tokenizer -> (LDM, AutoencoderKL,
    ClipTokenizer, config), frozen, in eval mode. Every tensor is checked against our networks (names and
    shapes, strictly); the weights are never changed, only renamed (and k, v fused)."""
    folder = os.path.isdir(path) and os.path.isdir(os.path.join(path, "unet"))
    unet, ae, text, settings = read_sd_folder(path) if folder else read_sd_file(path)
    if tokenizer is None and not folder:
        raise UserError(f"--weights {path} is a single file without CLIP's vocabulary: give --tokenizer "
                        f"PATH ({ClipTokenizer.VOCAB_FILE}, or the tokenizer/ folder of a diffusers copy)")
    tok = ClipTokenizer.load(tokenizer or path)
    size = image_size or settings.pop("image_size", SD_V1["image_size"])
    settings.pop("image_size", None)
    cfg = dict(sd_config(unet, ae, text, size, settings.pop("heads", SD_V1["heads"]),
                         settings.pop("text_heads", None)), **settings)
    if size % (cfg["f"] * 2 ** (len(cfg["ch_mult"]) - 1)):
        raise UserError(f"--image-size {size}: use a multiple of {cfg['f'] * 2 ** (len(cfg['ch_mult']) - 1)}")
    model = LDM(cfg)
    load_mapped(model.unet, unet, path)
    load_mapped(model.text, text, path)
    ae_net = load_mapped(AutoencoderKL(cfg), ae, path)
    return model.eval().requires_grad_(False), ae_net.eval().requires_grad_(False), tok, cfg
