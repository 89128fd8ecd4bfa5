"""
DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven Generation (Ruiz et al., 2023),
https://arxiv.org/abs/2208.12242 -- on an ldm.py text-to-image checkpoint, or on Stable Diffusion v1.

    python ldm.py --train                          # first: the base model, out/ldm/ckpt.pt
    python dreambooth.py --train                   # 4 images of the subject -> out/dreambooth/ckpt.pt
    python dreambooth.py --sample --prompt "a blue sks circle on the left"
    python dreambooth.py --train --no-prior --out out/dreambooth_noprior     # the ablation
    python dreambooth.py --eval                    # subject fidelity, prompt fidelity, language drift
    python dreambooth.py --train --weights v1-5-pruned-emaonly.safetensors \\
        --tokenizer bpe_simple_vocab_16e6.txt.gz \\
        --data my_dog/ --class-prompt "a photo of a dog"     # Stable Diffusion (README 'Released weights')

The subject: by default 4 images of common.ShapesData(subject=True), a ring (a circle with a hole) that the
shapes data never draws (any colour, size, position), or 3-5 images of your own with --data (or
--instance-dir).
They are bound to a rare identifier [V] = "sks" and the class noun: the class prompt c_pr (--class-prompt,
default "a circle") with [V] put before its noun (its last word, or --class-noun) is the instance prompt,
"a sks circle" ("a photo of a sks dog"). On ldm.py's own model "sks" is not a word of the vocabulary (built
from the training captions), so the vocabulary is extended by it and the text encoder's embedding table by one
new row (random, at the scale of the trained rows); Stable Diffusion's BPE tokenizer spells it from subwords.

Class-specific prior preservation (Sec. 3.3): x_pr = --num-class-images samples of the FROZEN base model for
the class prompt c_pr, generated once before fine-tuning (kept in <out>/class_<noun>/; missing ones are
generated). Fine-tuning minimizes (eq. 2, in the eps-parameterization of the base model, on latents):
    E || eps - eps_theta(z_t, t, c_id) ||^2 + lambda E || eps' - eps_theta(z'_t', t', c_pr) ||^2,  lambda = 1
with z = E(x) the latent of an instance image and z' = E(x_pr) that of a class image. As in diffusers'
train_dreambooth.py, one batch holds [instances..., class images...], one U-Net call predicts both and the
prediction is split at the number of instances (the order must match the split). --no-prior
drops the second term (the paper's ablation). The U-Net is fine-tuned (and the text encoder with
--train-text-encoder), AdamW (0.9, 0.999), weight decay 1e-2, gradient clipping 1, constant low lr, no EMA.
Images are drawn as the base model draws them: DDIM (Song et al. 2021, eq. 12, eta = 0) with classifier-free
guidance (Ho & Salimans 2022, eq. 6) against the empty prompt (common.draw_latent, ldm.py's sampler).

The networks, the tokenizers, the sampler and the loading of both kinds of base model are common.py's
(common.LDM, common.AutoencoderKL, common.draw_latent, common.load_ldm, common.load_stable_diffusion); this
file holds the method.
"""
import copy
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common

PRESETS = {
    # seconds, for tests: a handful of steps
    "tiny": dict(max_steps=4, batch_size=1, lr=1e-4, weight_decay=1e-2, grad_clip=1.0, log_every=2,
                 judge_steps=30, subject_judge_steps=20),
    # the default: a few hundred steps at a tenth of ldm.py's cpu learning rate (5e-4 and 1e-3 broke the
    # images)
    "cpu": dict(max_steps=400, batch_size=2, lr=1e-4, weight_decay=1e-2, grad_clip=1.0, log_every=25),
    # diffusers' README example for Stable Diffusion: 800 steps, batch 1, lr 5e-6 (the paper: ~1000 steps);
    # the default with --weights
    "paper": dict(max_steps=800, batch_size=1, lr=5e-6, weight_decay=1e-2, grad_clip=1.0, log_every=50),
}
DEFAULT_STEPS = 50
DEFAULT_SCALE = 3.0
SD_SCALE = 7.5       # Stable Diffusion's released guidance scale
BASE = os.path.join("out", "ldm", "ckpt.pt")
# the flags a --resume takes from the checkpoint
SETTINGS = ("base", "weights", "tokenizer", "instance_dir", "identifier", "class_noun", "class_prompt",
            "num_class_images", "prior_weight", "no_prior", "train_text_encoder", "image_size")
# --seed + these keep apart the random draws that share --seed
IDENTIFIER_SEED = 8191      # the identifier's new embedding row
INSTANCE_SEED = 4242        # the default subject's instance images
CLASS_IMAGES_SEED = 1234    # the class images (+ how many exist already: the missing ones are new draws)
SUBJECT_EVAL_SEED = 99      # --eval's held-out subject images


#################################################################################
#    The paper's method: the identifier, the class prior, eq. 2 (Sec. 3.2-3.3)  #
#################################################################################
# The networks are the base model's (common.LDM: the latent U-Net and the text encoder), fine-tuned here.

def instance_prompt(class_prompt, noun, ident):
    """The instance prompt: the class prompt with the identifier [V] before the (last) class noun, "a [V]
    [class noun]" (Sec. 3.2): "a circle" -> "a sks circle", "a photo of a dog" -> "a photo of a sks dog"."""
    words = class_prompt.split()
    i = max(j for j, w in enumerate(words) if common.WordTokenizer.words(w) == [noun])
    return " ".join(words[:i] + [ident] + words[i:])


def subject_words(args, tok, cfg):
    """(identifier, class noun, class prompt, instance prompt) from the flags, checked against the base."""
    class_prompt = args.class_prompt or f"a {args.class_noun or 'circle'}"
    noun = common.WordTokenizer.words(args.class_noun or class_prompt.split()[-1])
    if len(noun) != 1 or not any(common.WordTokenizer.words(w) == noun for w in class_prompt.split()):
        raise common.UserError(f"--class-noun '{args.class_noun}': one word of the class prompt "
                               f"'{class_prompt}'")
    ident = common.WordTokenizer.words(args.identifier)
    if len(ident) != 1:
        raise common.UserError(f"--identifier '{args.identifier}': use one word of letters and digits, "
                               "e.g. sks")
    unknown = tok.unknown(class_prompt)          # none for CLIP's tokenizer: it spells every word
    if unknown:
        raise common.UserError(f"--class-noun/--class-prompt '{class_prompt}': {', '.join(unknown)} not in "
                               f"the base vocabulary; use words of {', '.join(cfg['vocab'][3:])}")
    return ident[0], noun[0], class_prompt, instance_prompt(class_prompt, noun[0], ident[0])


def extend_vocab(model, cfg, words, seed=0):
    """Append the words the vocabulary lacks (the identifier) and give each a new row of the text encoder's
    embedding table, N(0, std^2) with std that of the trained rows. Returns the new cfg (the model is
    changed in place)."""
    new = [w for w in words if w not in cfg["vocab"]]
    if not new:
        return cfg
    old = model.text.tok.weight.data
    g = torch.Generator().manual_seed(seed + IDENTIFIER_SEED)
    rows = torch.randn(len(new), old.shape[1], generator=g).to(old) * old.std()
    emb = nn.Embedding(old.shape[0] + len(new), old.shape[1]).to(old.device)
    emb.weight.data.copy_(torch.cat([old, rows]))
    model.text.tok = emb
    return {**cfg, "vocab": list(cfg["vocab"]) + new}


def sample(model, ae, cfg, tok, prompts, scale=DEFAULT_SCALE, steps=DEFAULT_STEPS, progress=False, abar=None):
    """Prompts -> images (n, C, H, W) in [-1, 1], drawn as the base model draws them (common.draw_latent:
    DDIM in latent space, guided against the empty prompt). abar: the schedule as Python floats."""
    dev = next(model.parameters()).device
    c, null = tok(list(prompts)).to(dev), tok([""] * len(prompts)).to(dev)
    return common.draw_latent(model, ae, cfg, c, null, scale, steps, progress=progress, abar=abar)


@torch.no_grad()
def class_images(base, ae, cfg, tok, prompt, n, folder, scale, steps, seed, batch=50):
    """The prior-preservation data x_pr (Sec. 3.3): n samples of the FROZEN base for the class prompt, kept as
    PNGs in `folder`; only the missing ones are generated (as diffusers does)."""
    os.makedirs(folder, exist_ok=True)
    have = sorted(f for f in os.listdir(folder) if f.endswith(".png"))[:n]
    if len(have) < n:
        print(f"dreambooth: generating {n - len(have)} class images for '{prompt}' with the frozen base -> "
              f"{folder}")
        torch.manual_seed(seed + CLASS_IMAGES_SEED + len(have))
        starts = range(len(have), n, batch)
        for s in common.steps_bar(starts, len(starts), "class images"):
            x = sample(base, ae, cfg, tok, [prompt] * min(batch, n - s), scale, steps)
            for j, im in enumerate(common.to_uint8(x)):
                Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im).save(f"{folder}/{s + j:05d}.png")
        have = sorted(f for f in os.listdir(folder) if f.endswith(".png"))[:n]
    mode = "L" if cfg["channels"] == 1 else "RGB"
    x = torch.stack([common.to_tensor(Image.open(os.path.join(folder, f)).convert(mode)) for f in have])
    if x.shape[-1] != cfg["image_size"]:
        raise common.UserError(f"{folder} holds {x.shape[-1]}px images, not the base's "
                               f"{cfg['image_size']}px; delete it to regenerate")
    return x


def dreambooth_loss(net, z0, tokens, n_inst, abar, prior_weight=1.0, t=None, eps=None):
    """Eq. 2 with prior preservation on a batch ordered [instance..., class...] (z0, tokens): one U-Net call,
    the prediction split at n_inst. loss = ||eps - eps_theta||^2 over the instances + lambda ||eps' -
    eps_theta||^2 over the class images (each a mean); with no class rows, the instance term alone."""
    t = torch.randint(0, len(abar), (z0.shape[0],), device=z0.device) if t is None else t
    eps = torch.randn_like(z0) if eps is None else eps
    a = common.extract(abar, t, z0.shape)
    pred = net(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, tokens).float()      # z_t of eq. 2 (DDPM eq. 4)
    inst = F.mse_loss(pred[:n_inst], eps[:n_inst].float())
    if n_inst == z0.shape[0]:
        return inst, {"inst": inst.item()}
    prior = F.mse_loss(pred[n_inst:], eps[n_inst:].float())
    return inst + prior_weight * prior, {"inst": inst.item(), "prior": prior.item()}


def fine_tuning_batch(inst, cls, bs, g):
    """z_0 of eq. 2 for one step, ordered [bs instances..., bs class images...] (no class rows without the
    prior): each latent drawn afresh from q(z | x) = N(mean, std^2), given as (mean, std) per image."""
    i = torch.randint(len(inst[0]), (bs,), generator=g)
    mean, std = inst[0][i], inst[1][i]
    if cls is not None:
        j = torch.randint(len(cls[0]), (bs,), generator=g)
        mean, std = torch.cat([mean, cls[0][j]]), torch.cat([std, cls[1][j]])
    return mean + std * torch.randn_like(mean)


#################################################################################
#    The paper's metrics (Sec. 4.1), with the shapes judge for DINO and CLIP    #
#################################################################################

def similarity(judge, x, ref):
    """Subject fidelity as the paper's DINO score: the mean cosine similarity of judge features of images x to
    those of the reference images; with x is ref, over the distinct pairs only."""
    f = F.normalize(common.features(judge, x), dim=1)
    r = f if x is ref else F.normalize(common.features(judge, ref), dim=1)
    if x is ref:
        k = len(r)
        return (((f @ r.T).sum() - k) / max(1, k * (k - 1))).item()
    return (f @ r.T).mean().item()


def diversity(judge, x):
    """DIV: the mean pairwise L2 distance of judge features (the paper uses LPIPS, not available offline)."""
    f = common.features(judge, x).float()
    n = len(f)
    return (torch.cdist(f, f).sum() / max(1, n * (n - 1))).item()


def is_subject(subject_judge, x):
    """1 for each image the subject judge calls the subject (the ring), else 0: subject fidelity on shapes."""
    return (common.judge_predict(subject_judge, x)["subject"] == 1).float()


def ordinary(judge, subject_judge, x, noun):
    """Language drift (PRES): 1 for each class-prompt sample that is an ordinary member of the class: not the
    subject (when a subject judge exists) and, for a shapes noun, of the right shape."""
    keep = torch.ones(len(x)) if subject_judge is None else 1 - is_subject(subject_judge, x)
    if noun in common.SHAPES:
        keep = keep * (common.judge_predict(judge, x)["shape"] == common.SHAPES.index(noun)).float()
    return keep


#################################################################################
#                           Training: the fine-tuning                           #
#################################################################################

def instance_images(d, cfg, seed=0):
    """The images of folder d (--instance-dir or --data), or for d None the default: 4 images of
    ShapesData(subject=True) (a ring)."""
    size, ch = cfg["image_size"], cfg["channels"]
    if d is None:
        data = common.ShapesData(size, ch, seed=seed + INSTANCE_SEED, subject=True)
        return torch.stack([data[i][0] for i in range(4)])
    data = common.load_folder(d, size, ch)
    if not 3 <= len(data) <= 5:
        common.warn(f"{len(data)} instance image(s); the paper uses 3-5")
    return torch.stack([data[i][0] for i in range(len(data))])


def resume(args, dcfg, path):
    """--resume: the checkpoint and its settings (into args and the returned dcfg), all but --max-steps."""
    ck = common.load_checkpoint(path, ["dreambooth"])
    db = ck["dreambooth"]
    common.resume_seed(args, ck)
    for k in SETTINGS:
        setattr(args, k, db.get(k))
    dcfg = {**dcfg, **{k: db[k] for k in ("batch_size", "lr", "weight_decay", "grad_clip")},
            "max_steps": args.max_steps or db["max_steps"]}
    settings = ", ".join(f"{k} {db.get(k)}" for k in SETTINGS if db.get(k) not in (None, False))
    print(f"dreambooth: resuming {path} at step {ck['step']} with its settings ({settings})")
    return ck, dcfg


def train(args, dcfg):
    """Fine-tune the base (eq. 2) through common.train_loop: every draw of step k is seeded from (seed, k), so
    --resume continues exactly. Stable Diffusion is fine-tuned in place once its class images exist (its file
    is the frozen base) and its checkpoint keeps only the trained networks; ldm.py's small base is copied and
    stays frozen beside it. Returns (the fine-tuned model, the frozen base or None)."""
    device, path, ck = common.get_device(args.device), os.path.join(args.out, "ckpt.pt"), None
    if args.resume:
        ck, dcfg = resume(args, dcfg, path)
        if common.already_done("dreambooth", ck["step"], dcfg["max_steps"]):
            return None, None
    base, ae, tok, cfg, info = load_base(args)
    base, ae, sd = base.to(device), ae.to(device), bool(args.weights)
    ident, noun, class_prompt, inst_prompt = subject_words(args, tok, cfg)
    if not sd and ident in cfg["vocab"] and ck is None:
        common.warn(f"the identifier '{ident}' is a word the base already knows; DreamBooth wants a rare one")
    x_inst = instance_images(args.instance_dir, cfg, args.seed)
    steps, scale = args.steps or DEFAULT_STEPS, default_scale(args, sd)
    x_cls = None if args.no_prior else class_images(base, ae, cfg, tok, class_prompt, args.num_class_images,
                                                    os.path.join(args.out, f"class_{noun}"), scale, steps,
                                                    args.seed)
    torch.manual_seed(args.seed)
    model = base if sd else copy.deepcopy(base)       # ldm.py's base itself stays frozen and unchanged
    if not sd:
        cfg = extend_vocab(model, cfg, [ident], args.seed)
        tok = common.WordTokenizer(cfg["vocab"], cfg["max_len"])
    model.requires_grad_(False).unet.requires_grad_(True)
    model.text.requires_grad_(args.train_text_encoder)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=dcfg["lr"], betas=(0.9, 0.999), weight_decay=dcfg["weight_decay"])
    step = 0
    if ck is not None:
        model.load_state_dict({**model.state_dict(), **ck["model"]})
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
    abar = common.on_device(device)(common.alphas_cumprod(cfg))

    @torch.no_grad()
    def posterior(x):
        """Mean and std of q(z | x) of each image, encoded once: each step samples its z from them."""
        ms = [ae.encode(x[i:i + 16].to(device)) for i in range(0, len(x), 16)]
        return torch.cat([m for m, _ in ms]), torch.cat([(0.5 * lv).exp() for _, lv in ms])

    inst, cls = posterior(x_inst), None if x_cls is None else posterior(x_cls)
    bs, last, amp = dcfg["batch_size"], {}, common.autocast(device, args.dtype)
    tokens = tok([inst_prompt] * bs + [class_prompt] * (0 if cls is None else bs)).to(device)
    net = torch.compile(model) if args.compile else model         # `model` keeps the plain names to save

    def step_fn(step, batch):
        g = torch.Generator().manual_seed(common.step_seed(args.seed, step))
        z0 = fine_tuning_batch(inst, cls, bs, g) * cfg["scale_factor"]
        with amp:
            loss, logs = dreambooth_loss(net, z0.float(), tokens, bs, abar, args.prior_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, dcfg["grad_clip"])
        opt.step()
        last.update(logs)
        return logs

    db = {**{k: getattr(args, k) for k in SETTINGS}, "identifier": ident, "class_noun": noun,
          "instance_prompt": inst_prompt, "class_prompt": class_prompt, "prior": x_cls is not None,
          "num_instance_images": len(x_inst), "base": None if sd else os.path.abspath(args.base), **info,
          **dcfg}
    trained = ("unet.", "text.") if args.train_text_encoder or not sd else ("unet.",)
    keep = {} if sd else {"ae": {k: v.cpu() for k, v in ae.state_dict().items()},
                          "ae_config": common.load_checkpoint(args.base, ["ldm"])["ae_config"]}

    def save(step):
        if not common.all_finite(model):
            raise common.UserError("fine-tuned weights are not finite; nothing saved; try a lower --lr")
        weights = {k: v.cpu() for k, v in model.state_dict().items() if k.startswith(trained)}
        common.save_checkpoint({"script": "dreambooth", "kind": "dreambooth", "config": cfg,
                                "dreambooth": {**db, "last_losses": dict(last)}, "model": weights, **keep,
                                "opt": opt.state_dict(), "step": step, "seed": args.seed}, path)

    prior = "no prior preservation"
    if x_cls is not None:
        prior = f"{len(x_cls)} class images {class_prompt!r}, lambda {args.prior_weight:g}"
    text = " and the text encoder" if args.train_text_encoder else ""
    cls_batch = "" if x_cls is None else f" + {bs}"
    print(f"dreambooth: {len(x_inst)} instance images '{inst_prompt}', {prior}; training the U-Net{text} "
          f"({sum(p.numel() for p in params) / 1e6:.2f}M parameters), steps {step} -> {dcfg['max_steps']}, "
          f"batch {bs}{cls_batch}, lr {dcfg['lr']:g}, device {device}", flush=True)
    model.train()
    # a checkpoint at the end and on Ctrl-C, none on the way: fine-tuning is short and a fine-tuned Stable
    # Diffusion checkpoint is gigabytes
    step = common.train_loop("dreambooth", step_fn, save, step, dcfg["max_steps"], path,
                             {**dcfg, "ckpt_every": dcfg["max_steps"]})
    model.eval().requires_grad_(False)
    common.save_grid(x_inst, os.path.join(args.out, "instance_images.png"))
    torch.manual_seed(args.seed)
    n = args.n_samples or (2 if sd else 8)
    x = sample(model, ae, cfg, tok, [inst_prompt] * n + [class_prompt] * n, scale, steps)
    common.save_grid(x, os.path.join(args.out, "samples.png"), nrow=n)
    print(f"fine-tuned to step {step}; checkpoint {path}; samples.png: row 1 '{inst_prompt}', "
          f"row 2 '{class_prompt}'")
    return model, None if sd else base


#################################################################################
#                                    Sampling                                   #
#################################################################################

def default_scale(args, sd):
    """--scale, else the guidance scale of the base: Stable Diffusion's release or ldm.py's default."""
    if args.scale is not None:
        return args.scale
    return SD_SCALE if sd else DEFAULT_SCALE


def load_base(args):
    """The base model: Stable Diffusion (--weights, --tokenizer) or an ldm.py text checkpoint (--base) ->
    model, autoencoder (frozen, eval mode), tokenizer, config, checkpoint-like dict."""
    if args.weights:
        model, ae, tok, cfg = common.load_stable_diffusion(args.weights, args.tokenizer, args.image_size)
        return model, ae, tok, cfg, {"weights": os.path.abspath(args.weights),
                                     "tokenizer": args.tokenizer and os.path.abspath(args.tokenizer)}
    if not os.path.exists(args.base):
        raise common.UserError(f"base model {args.base} not found; train one with `python ldm.py --train` "
                               "(or pass --base PATH, or --weights for Stable Diffusion)")
    model, ae, cfg, ck = common.load_ldm(args.base, ("ldm",))
    if cfg.get("cond") != "text":
        raise common.UserError(f"{args.base} is a class-conditional LDM; DreamBooth needs a text model "
                               "(`python ldm.py --train --cond text`)")
    return model, ae, common.WordTokenizer(cfg["vocab"], cfg["max_len"]), cfg, {}


def load_model(args):
    """The fine-tuned checkpoint (--ckpt, default <out>/ckpt.pt) -> model, autoencoder (frozen, eval mode),
    tokenizer, config, checkpoint. Fine-tuned Stable Diffusion keeps only its trained tensors: the rest is
    read from its --weights file again."""
    path = args.ckpt or os.path.join(args.out, "ckpt.pt")
    if not os.path.exists(path):
        raise common.UserError(f"checkpoint {path} not found; fine-tune one with `python dreambooth.py "
                               "--train`")
    ck = common.load_checkpoint(path, ["dreambooth"])
    db = ck["dreambooth"]
    if not db.get("weights"):
        model, ae, cfg, ck = common.load_ldm(path, ("dreambooth",))
        return model, ae, common.WordTokenizer(cfg["vocab"], cfg["max_len"]), cfg, ck
    size = ck["config"]["image_size"]
    model, ae, tok, cfg = common.load_stable_diffusion(db["weights"], db["tokenizer"], size)
    model.load_state_dict({**model.state_dict(), **ck["model"]})
    return model, ae, tok, cfg, ck


def sample_images(args, device):
    model, ae, tok, cfg, ck = load_model(args)
    model, ae = model.to(device), ae.to(device)
    prompt = ck["dreambooth"]["instance_prompt"] if args.prompt is None else args.prompt
    common.check_prompt(tok, prompt)
    sd = bool(ck["dreambooth"].get("weights"))
    n, scale = args.n_samples or (1 if sd else 16), default_scale(args, sd)
    steps = args.steps or DEFAULT_STEPS
    torch.manual_seed(args.seed)
    t0 = time.time()
    with common.autocast(device, args.dtype):
        x = sample(model, ae, cfg, tok, [prompt] * n, scale, steps, progress=True)
    path = os.path.join(args.out, "samples.png")
    common.save_grid(x, path)
    print(f"{n} samples for '{prompt}', scale {scale:g}, {steps} DDIM steps, {time.time() - t0:.2f}s: {path}")
    return x


#################################################################################
#    Evaluation: subject fidelity, prompt fidelity, language drift (Sec. 4)     #
#################################################################################

def evaluate(args, device):
    """--eval: on --n-samples images per prompt set (default 100), for the fine-tuned model and (language
    drift) for its base: subject fidelity = fraction of 'a sks circle' samples the subject judge calls the
    subject; prompt fidelity = fraction of recontextualized samples ('a blue sks circle on the left', ...)
    with every named attribute right (common.attribute_accuracy) and the fraction still the subject; drift =
    fraction of 'a circle' samples that are ordinary circles (shape right, no hole) and their diversity.
    Then common.evaluate (FID/KID, caption accuracy on held-out ordinary captions) for the fine-tuned model.
    subject_ceiling: the fraction of held-out subject images the subject judge still calls the subject after
    the autoencoder (encode, decode): what the latent space lets through. A subject of your own (--data) has
    no subject judge: its fidelity is the similarity of the samples to the instance images, beside the
    instances' own similarity to each other, and the ceiling is the autoencoder's PSNR on the instances."""
    model, ae, tok, cfg, ck = load_model(args)
    db = ck["dreambooth"]
    if db.get("weights"):
        raise common.UserError("--eval measures the shapes experiment (judges trained on shapes); look at "
                               "--sample's images of a fine-tuned Stable Diffusion instead")
    model, ae = model.to(device), ae.to(device)
    size, ch, n = cfg["image_size"], cfg["channels"], args.n_samples or 100
    scale, steps = default_scale(args, False), args.steps or DEFAULT_STEPS
    judge_steps = PRESETS[args.preset].get("judge_steps", common.JUDGE_STEPS)
    judge = common.get_judge("shapes", size, ch, device, steps=judge_steps)
    own = db.get("instance_dir") is not None        # the user's subject: the ring judge cannot tell it
    sj = None if own else common.subject_judge(size, ch, device,
                                               PRESETS[args.preset].get("subject_judge_steps", 400))
    ident, noun = db["identifier"], db["class_noun"]
    rng = np.random.default_rng(args.seed)
    recontext = [f"a {rng.choice(common.SIZES)} {rng.choice(list(common.COLORS))} {ident} {noun} "
                 f"{common.POSITION_WORDS[rng.choice(common.POSITIONS)]}" for _ in range(n)]

    def draw(m, prompts):
        torch.manual_seed(args.seed)
        bs = args.batch_size or 100
        with common.autocast(device, args.dtype):
            return torch.cat([common.quantize(sample(m, ae, cfg, tok, prompts[i:i + bs], scale, steps).cpu())
                              for i in range(0, len(prompts), bs)])

    @torch.no_grad()
    def autoencoded(x):
        return torch.cat([ae.decode(ae.encode(x[i:i + 100].to(device))[0]).float().clamp(-1, 1).cpu()
                          for i in range(0, len(x), 100)])

    x_id, x_rc = draw(model, [db["instance_prompt"]] * n), draw(model, recontext)
    res = {"script": "dreambooth", "mode": "dreambooth", "n": n, "scale": scale, "steps": steps,
           "prior": db["prior"], "train_text_encoder": db["train_text_encoder"],
           "prompt_fidelity": common.attribute_accuracy(judge, x_rc, recontext)}
    if own:
        x_inst = instance_images(db["instance_dir"], cfg)
        res.update({"instance_recon_psnr": common.psnr(x_inst, autoencoded(x_inst)),
                    "subject_similarity": similarity(judge, x_id, x_inst),
                    "instance_similarity": similarity(judge, x_inst, x_inst)})
    else:
        # the most subject fidelity can be through this autoencoder: held-out subject images, encoded, decoded
        subjects = common.ShapesData(size, ch, seed=args.seed + SUBJECT_EVAL_SEED, subject=True)
        rec = autoencoded(torch.stack([subjects[i][0] for i in range(n)]))
        res.update({"subject_judge_acc": sj.accuracy,
                    "subject_ceiling": is_subject(sj, common.quantize(rec)).mean().item(),
                    "subject_fidelity": is_subject(sj, x_id).mean().item(),
                    "prompt_subject": is_subject(sj, x_rc).mean().item()})
    models = [("finetuned", model)]
    if os.path.exists(db["base"]):
        models.append(("base", common.load_ldm(db["base"], ("ldm",))[0].to(device)))
    for name, m in models:
        x = draw(m, [db["class_prompt"]] * n)
        res[f"class_ordinary_{name}"] = ordinary(judge, sj, x, noun).mean().item()
        if own:                                  # the control: the class prompt's samples against the subject
            res[f"class_similarity_{name}"] = similarity(judge, x, x_inst)
        res[f"class_diversity_{name}"] = diversity(judge, x)
        common.save_grid(x[:64], os.path.join(args.out, f"eval_class_{name}.png"))
    common.save_grid(x_id[:64], os.path.join(args.out, "eval_subject.png"))
    common.save_grid(x_rc[:64], os.path.join(args.out, "eval_recontext.png"))
    out, args.out = args.out, os.path.join(args.out, "eval_ordinary")
    ordinary_run = common.evaluate("dreambooth", args, {**cfg, "judge_steps": judge_steps},
                                   lambda k, wanted: sample(model, ae, cfg, tok, wanted, scale, steps),
                                   nfe=2 * steps, device=device, cond="caption")
    args.out = out
    res.update({"ordinary_fid": ordinary_run["fid"], "ordinary_acc": ordinary_run["acc"]})
    print(json.dumps(res))
    return res


#################################################################################
#                                  Command line                                 #
#################################################################################

def main(argv=None):
    p = common.make_parser("dreambooth", __doc__, PRESETS, weights=(
        "--train: Stable Diffusion v1.x as the base, a CompVis file (v1-5-pruned-emaonly.safetensors, "
        "sd-v1-4.ckpt) or a diffusers folder"))
    p.rule("--weights", goes_with="--train")
    p.rule("--image-size", goes_with="--weights")       # else the base checkpoint's
    p.add_argument("--tokenizer", metavar="PATH", goes_with="--train --weights",
                   type=common.existing_path("CLIP's bpe_simple_vocab_16e6.txt.gz or a tokenizer/ folder"),
                   help="CLIP's bpe_simple_vocab_16e6.txt.gz or a tokenizer/ folder; a diffusers folder "
                        "needs none")
    p.add_argument("--base", default=BASE, help=f"the ldm.py checkpoint to fine-tune (default {BASE})")
    p.add_argument("--instance-dir", metavar="DIR", type=common.existing_path("a folder of 3-5 images of the "
                   "subject", folder=True), help="3-5 images of the subject (default: 4 generated "
                   "images of the shapes subject, a ring); --data DIR says the same")
    p.add_argument("--identifier", default="sks", help="the rare identifier word [V] (default sks)")
    p.add_argument("--class-prompt", help="the class prompt c_pr (default 'a <class noun>'); the instance "
                   "prompt puts [V] before its class noun")
    p.add_argument("--class-noun", help="the subject's class noun (default: the class prompt's last word; "
                   "circle)")
    p.add_argument("--num-class-images", type=common.positive_int, default=100,
                   help="prior-preservation images (default 100)")
    p.add_argument("--prior-weight", type=common.nonneg_float, default=1.0,
                   help="lambda of the prior loss (default 1)")
    p.add_argument("--no-prior", action="store_true", help="no prior preservation (the ablation)")
    p.add_argument("--train-text-encoder", action="store_true", help="fine-tune the text encoder too")
    p.add_argument("--prompt", goes_with="--sample",
                   help="the prompt (default the instance prompt, 'a sks circle')")
    p.add_argument("--scale", type=common.nonneg_float, help=f"classifier-free guidance scale (default "
                   f"{DEFAULT_SCALE:g}; {SD_SCALE:g} with --weights)")
    args = p.parse_args(argv)
    if args.channels is not None:
        raise common.UserError("--channels: set by the base checkpoint; drop it")
    if args.data != "shapes":
        if args.instance_dir not in (None, args.data):
            raise common.UserError("give the subject's images once: --data or --instance-dir")
        args.instance_dir = args.data
    if args.weights and args.preset is None:
        args.preset = "paper"                        # Stable Diffusion's fine-tuning settings
    dcfg = common.make_config(args, PRESETS)
    return common.run(args, lambda: train(args, dcfg), sample_images, evaluate)


if __name__ == "__main__":
    common.main_guard(main)
