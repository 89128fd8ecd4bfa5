"""guided.py --weights: OpenAI's U-Net and classifier layouts (ADM, Improved DDPM) mapped onto common.UNet
and guided.Classifier. guided-diffusion is not on PyPI, so the references are written here from the papers and
the published code's description: the state-dict layout its constructors produce (openai_unet_shapes) and a
plain functional forward pass over those tensors (ref_unet, ref_classifier); both fused-qkv orders against
unfused per-head attention, the [cos, sin] embedding, AdaGN's scale-then-shift order and the attention pool.
The full-size key lists of the released models are derived from their published configurations on the meta
device."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import common
import guided


# --- the published layout, written out from the constructors' description ------------------------------

def openai_unet_shapes(ch, mult, nrb, attn_ds, num_classes=None, in_ch=3, out_ch=3, scale_shift=True,
                       updown=True, classifier_size=None, classes=1000):
    """The state-dict shapes of guided-diffusion's UNetModel (or, with classifier_size, its EncoderUNetModel
    with the attention pool) and the order its modules run in: {name: shape}, program. Each input/output block
    is a list of (kind, prefix); kind in res, down, up (BigGAN resampling blocks), conv_down (op), conv_up
    (conv), attn."""
    shapes, emb = {}, 4 * ch

    def add(prefix, **named):
        for name, shape in named.items():
            shapes[f"{prefix}{name.replace('__', '.')}"] = shape

    def res(p, cin, cout):
        add(p, in_layers__0__weight=(cin,), in_layers__0__bias=(cin,), in_layers__2__weight=(cout, cin, 3, 3),
            in_layers__2__bias=(cout,), emb_layers__1__weight=((1 + scale_shift) * cout, emb),
            emb_layers__1__bias=((1 + scale_shift) * cout,), out_layers__0__weight=(cout,),
            out_layers__0__bias=(cout,), out_layers__3__weight=(cout, cout, 3, 3),
            out_layers__3__bias=(cout,))
        if cin != cout:
            add(p, skip_connection__weight=(cout, cin, 1, 1), skip_connection__bias=(cout,))

    def attn(p, c):
        add(p, norm__weight=(c,), norm__bias=(c,), qkv__weight=(3 * c, c, 1), qkv__bias=(3 * c,),
            proj_out__weight=(c, c, 1), proj_out__bias=(c,))

    add("", time_embed__0__weight=(emb, ch), time_embed__0__bias=(emb,), time_embed__2__weight=(emb, emb),
        time_embed__2__bias=(emb,), input_blocks__0__0__weight=(ch, in_ch, 3, 3),
        input_blocks__0__0__bias=(ch,))
    if num_classes:
        add("", label_emb__weight=(num_classes, emb))
    program = {"input": [], "middle": [], "output": []}
    chans, c, ds = [ch], ch, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            p = f"input_blocks.{len(program['input']) + 1}."
            res(p + "0.", c, m * ch)
            c, block = m * ch, [("res", p + "0.")]
            if ds in attn_ds:
                attn(p + "1.", c)
                block.append(("attn", p + "1."))
            program["input"].append(block)
            chans.append(c)
        if level != len(mult) - 1:
            p = f"input_blocks.{len(program['input']) + 1}.0."
            if updown:
                res(p, c, c)
            else:
                add(p, op__weight=(c, c, 3, 3), op__bias=(c,))
            program["input"].append([("down" if updown else "conv_down", p)])
            chans.append(c)
            ds *= 2
    res("middle_block.0.", c, c), attn("middle_block.1.", c), res("middle_block.2.", c, c)
    program["middle"] = [("res", "middle_block.0."), ("attn", "middle_block.1."), ("res", "middle_block.2.")]
    if classifier_size:
        n = (classifier_size // ds) ** 2 + 1
        add("out.", **{"0__weight": (c,), "0__bias": (c,), "2__positional_embedding": (c, n),
                       "2__qkv_proj__weight": (3 * c, c, 1), "2__qkv_proj__bias": (3 * c,),
                       "2__c_proj__weight": (classes, c, 1), "2__c_proj__bias": (classes,)})
        return shapes, program
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nrb + 1):
            p = f"output_blocks.{len(program['output'])}."
            res(p + "0.", c + chans.pop(), m * ch)
            c, block = m * ch, [("res", p + "0.")]
            if ds in attn_ds:
                attn(p + "1.", c)
                block.append(("attn", p + "1."))
            if level and i == nrb:
                q = f"{p}{len(block)}."
                if updown:
                    res(q, c, c)
                else:
                    add(q, conv__weight=(c, c, 3, 3), conv__bias=(c,))
                block.append(("up" if updown else "conv_up", q))
                ds //= 2
            program["output"].append(block)
    add("out.", **{"0__weight": (c,), "0__bias": (c,), "2__weight": (out_ch, ch, 3, 3), "2__bias": (out_ch,)})
    return shapes, program


def random_tensors(shapes, seed=0):
    """Random weights of the given shapes, scaled so that activations neither vanish nor explode."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[k] = 1 + 0.2 * t if k.endswith("weight") and len(shape) == 1 else t   # GroupNorm gains near 1
    return out


# --- a plain forward pass over the published tensors ---------------------------------------------------

def ref_embedding(t, dim):
    """The published sinusoid: cos first, then sin, frequencies 10000^(-i / half)."""
    half = dim // 2
    freqs = torch.tensor([10000 ** (-i / half) for i in range(half)], dtype=torch.float64)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


def ref_gn(sd, p, x):
    return F.group_norm(x, 32, sd[p + "weight"], sd[p + "bias"], eps=1e-5)


def ref_res(sd, p, x, emb, resample=None):
    """The residual block: GN, SiLU, (resample both paths), conv; the embedding projected, then either AdaGN
    (its first half the scale, its second the shift) or added; GN, SiLU, conv; plus the skip."""
    h = F.silu(ref_gn(sd, p + "in_layers.0.", x))
    if resample == "down":
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    elif resample == "up":
        up = lambda z: F.interpolate(z, scale_factor=2.0, mode="nearest")
        h, x = up(h), up(x)
    h = F.conv2d(h, sd[p + "in_layers.2.weight"], sd[p + "in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), sd[p + "emb_layers.1.weight"], sd[p + "emb_layers.1.bias"])[:, :, None, None]
    if e.shape[1] == 2 * h.shape[1]:
        scale, shift = e[:, :h.shape[1]], e[:, h.shape[1]:]
        h = ref_gn(sd, p + "out_layers.0.", h) * (1 + scale) + shift
    else:
        h = ref_gn(sd, p + "out_layers.0.", h + e)
    h = F.conv2d(F.silu(h), sd[p + "out_layers.3.weight"], sd[p + "out_layers.3.bias"], padding=1)
    if p + "skip_connection.weight" in sd:
        x = F.conv2d(x, sd[p + "skip_connection.weight"], sd[p + "skip_connection.bias"])
    return x + h


def unfused_attention(qkv, heads, order):
    """Attention from a fused projection qkv (B, 3C, T), head by head: row r of the 3C rows holds channel i of
    head h of part s (q, k or v) at r = (s C + h d + i) in the 'new' order and r = (h 3d + s d + i) in the
    'legacy' one (d = C / heads)."""
    B, W, T = qkv.shape
    C = W // 3
    d = C // heads
    out = torch.zeros(B, C, T)
    for h in range(heads):
        rows = [[(s * C + h * d + i) if order == "new" else (h * 3 * d + s * d + i) for i in range(d)]
                for s in range(3)]
        q, k, v = (qkv[:, r] for r in rows)                                        # (B, d, T) each
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
        out[:, h * d:(h + 1) * d] = torch.einsum("bts,bcs->bct", w, v)
    return out


def ref_attn(sd, p, x, heads, order):
    B, C, H, W = x.shape
    x = x.reshape(B, C, H * W)
    qkv = F.conv1d(ref_gn(sd, p + "norm.", x), sd[p + "qkv.weight"], sd[p + "qkv.bias"])
    h = F.conv1d(unfused_attention(qkv, heads, order), sd[p + "proj_out.weight"], sd[p + "proj_out.bias"])
    return (x + h).reshape(B, C, H, W)


def ref_run(sd, block, h, emb, heads_of, order):
    for kind, p in block:
        if kind == "attn":
            h = ref_attn(sd, p, h, heads_of(h.shape[1]), order)
        elif kind == "conv_down":
            h = F.conv2d(h, sd[p + "op.weight"], sd[p + "op.bias"], stride=2, padding=1)
        elif kind == "conv_up":
            h = F.conv2d(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd[p + "conv.weight"],
                         sd[p + "conv.bias"], padding=1)
        else:
            h = ref_res(sd, p, h, emb, {"res": None, "down": "down", "up": "up"}[kind])
    return h


def ref_emb(sd, t, y=None):
    e = F.linear(ref_embedding(t, sd["time_embed.0.weight"].shape[1]), sd["time_embed.0.weight"],
                 sd["time_embed.0.bias"])
    e = F.linear(F.silu(e), sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    return e + sd["label_emb.weight"][y] if y is not None else e


def ref_unet(sd, program, x, t, y, heads_of, order):
    """The published UNetModel.forward: embedding, input blocks (each output kept), middle, output blocks on
    the concatenation with the kept features, GN, SiLU, conv."""
    emb = ref_emb(sd, t, y)
    h = F.conv2d(x, sd["input_blocks.0.0.weight"], sd["input_blocks.0.0.bias"], padding=1)
    hs = [h]
    for block in program["input"]:
        h = ref_run(sd, block, h, emb, heads_of, order)
        hs.append(h)
    h = ref_run(sd, program["middle"], h, emb, heads_of, order)
    for block in program["output"]:
        h = ref_run(sd, block, torch.cat([h, hs.pop()], dim=1), emb, heads_of, order)
    return F.conv2d(F.silu(ref_gn(sd, "out.0.", h)), sd["out.2.weight"], sd["out.2.bias"], padding=1)


def ref_pool(sd, x, heads):
    """The classifier's attention pool (after CLIP): the mean token prepended to the HW tokens, the position
    table (C, HW + 1) added, attention over all of them with the fused qkv in the 'new' order, the output
    projection, and the mean token's row."""
    B, C = x.shape[:2]
    x = x.reshape(B, C, -1)
    x = torch.cat([x.mean(-1, keepdim=True), x], -1) + sd["out.2.positional_embedding"][None]
    qkv = F.conv1d(x, sd["out.2.qkv_proj.weight"], sd["out.2.qkv_proj.bias"])
    h = F.conv1d(unfused_attention(qkv, heads, "new"), sd["out.2.c_proj.weight"], sd["out.2.c_proj.bias"])
    return h[:, :, 0]


def ref_classifier(sd, program, x, t, heads_of):
    emb = ref_emb(sd, t)
    h = F.conv2d(x, sd["input_blocks.0.0.weight"], sd["input_blocks.0.0.bias"], padding=1)
    for block in program["input"] + [program["middle"]]:
        h = ref_run(sd, block, h, emb, heads_of, "legacy")
    return ref_pool(sd, F.silu(ref_gn(sd, "out.0.", h)), heads_of(h.shape[1]))


def flags(**kw):
    """guided.py's override flags as argparse leaves them when not given."""
    base = dict(image_size=None, heads=None, head_channels=None, qkv_order=None, schedule=None,
                timesteps=None, rescale_timesteps=None)
    return argparse.Namespace(**{**base, **kw})


# --- the pieces a shape check cannot catch -------------------------------------------------------------

def test_cos_sin_embedding_and_frequency_shift():
    t = torch.tensor([0, 1, 17, 999])
    torch.testing.assert_close(common.timestep_embedding(t, 64, cos_first=True), ref_embedding(t, 64),
                               rtol=1e-5, atol=1e-4)
    ours = common.timestep_embedding(t, 64)                                 # [sin, cos], as before
    ref = ref_embedding(t, 64)
    torch.testing.assert_close(ours, torch.cat([ref[:, 32:], ref[:, :32]], 1), rtol=1e-5, atol=1e-4)
    # DDPM's TensorFlow code divides the exponent by half - 1: the last frequency is exactly 1/10000
    shifted = common.timestep_embedding(torch.tensor([1.0]), 64, shift=1)
    assert shifted[0, 31].item() == pytest.approx(math.sin(1e-4), rel=1e-4)
    assert not torch.allclose(shifted, common.timestep_embedding(torch.tensor([1.0]), 64))


@pytest.mark.parametrize("order", ["legacy", "new"])
def test_fused_qkv_orders_match_unfused_attention(order):
    torch.manual_seed(0)
    C, heads = 32, 4
    sd = random_tensors({"norm.weight": (C,), "norm.bias": (C,), "qkv.weight": (3 * C, C, 1),
                         "qkv.bias": (3 * C,), "proj_out.weight": (C, C, 1), "proj_out.bias": (C,)})
    block = common.AttnBlock(C, heads, groups=32)
    torch.nn.ModuleDict({"b": block}).load_state_dict(
        common.openai_to_ours({"b." + k: v for k, v in sd.items()}, [], lambda c: heads, order))
    x = torch.randn(2, C, 4, 4)
    torch.testing.assert_close(block(x), ref_attn(sd, "", x, heads, order), rtol=1e-5, atol=1e-5)
    other = "new" if order == "legacy" else "legacy"                  # the orders are not interchangeable
    assert (block(x) - ref_attn(sd, "", x, heads, other)).abs().max() > 1e-2


def test_split_qkv_is_a_permutation_of_rows():
    w = torch.arange(3 * 8, dtype=torch.float32)[:, None].expand(-1, 5)    # row r holds r
    q, kv = common.split_qkv(w, 2, "legacy")                                # heads 2, d 4: [h][s][i]
    assert q[:, 0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert kv[:, 0].tolist() == [4, 5, 6, 7, 16, 17, 18, 19, 8, 9, 10, 11, 20, 21, 22, 23]
    q, kv = common.split_qkv(w, 2, "new")
    assert q[:, 0].tolist() == list(range(8)) and kv[:, 0].tolist() == list(range(8, 24))
    with pytest.raises(common.UserError, match="legacy or new"):
        common.split_qkv(w, 2, "newest")


def test_scale_shift_order_of_the_residual_block():
    shapes, _ = openai_unet_shapes(32, [1], 1, ())
    p = "input_blocks.1.0."
    sd = random_tensors({k[len(p):]: v for k, v in shapes.items() if k.startswith(p)})
    block = common.ResBlock(32, 32, 128, scale_shift=True, groups=32)
    torch.nn.ModuleDict({"b": block}).load_state_dict(
        common.openai_to_ours({"b." + k: v for k, v in sd.items()}, [], None, "new"))
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 128)
    torch.testing.assert_close(block(x, emb), ref_res(sd, "", x, emb), rtol=1e-5, atol=1e-5)
    swapped = dict(sd, **{"emb_layers.1.weight": sd["emb_layers.1.weight"].roll(32, 0),
                          "emb_layers.1.bias": sd["emb_layers.1.bias"].roll(32, 0)})
    assert (block(x, emb) - ref_res(swapped, "", x, emb)).abs().max() > 1e-2   # shift first would differ


# --- whole networks against the reference -------------------------------------------------------------

@pytest.mark.parametrize("order,updown,num_classes",
                         [("new", True, 5), ("legacy", True, None), ("legacy", False, 3)])
def test_openai_unet_matches_reference(tmp_path, order, updown, num_classes):
    shapes, program = openai_unet_shapes(32, [1, 2], 2, (2,), num_classes, out_ch=6, scale_shift=updown,
                                         updown=updown)
    sd = random_tensors(shapes)
    path = str(tmp_path / "adm.pt")
    torch.save(sd, path)
    args = argparse.Namespace(weights=path, **vars(flags(image_size=16, head_channels=16, qkv_order=order,
                                                         schedule="linear", timesteps=1000)))
    model, diff, ck = guided.load_weights(args, torch.device("cpu"))
    assert ck["config"]["var"] == "learned" and ck["config"]["attn_res"] == [8] and diff.T == 1000
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 900])
    y = torch.tensor([1, 4]) % num_classes if num_classes else None
    with torch.no_grad():
        ours, ref = model(x, t, y), ref_unet(sd, program, x, t, y, lambda c: c // 16, order)
    assert ref.abs().mean() > 0.1                                           # not a trivially small output
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_classifier_matches_reference():
    shapes, program = openai_unet_shapes(32, [1, 2], 1, (2,), classifier_size=16, classes=7)
    sd = random_tensors(shapes, seed=1)
    cfg = dict(num_classes=7, ch=32, ch_mult=[1, 2], depth=1, attn_res=[8], head_channels=16, image_size=16,
               channels=3, norm_groups=32, emb_cos_first=True)
    clf = guided.build_classifier(cfg)
    common.load_mapped(clf, common.classifier_from_openai(sd, lambda c: c // 16), "tiny classifier")
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 300, 999])
    with torch.no_grad():
        torch.testing.assert_close(clf(x, t), ref_classifier(sd, program, x, t, lambda c: c // 16),
                                   rtol=1e-4, atol=1e-4)


def test_rescaled_timesteps_and_scaled_linear_betas():
    cfg = dict(timesteps=4000, schedule="linear", var="learned", rescale_timesteps=True)
    d = guided.released_diffusion(cfg)
    assert d.betas[0].item() == pytest.approx(2.5e-5) and d.betas[-1].item() == pytest.approx(5e-3)
    assert d.timestep_map[[0, 1, 3999]].tolist() == [0.0, 0.25, 999.75]
    r = guided.respace(d, 100)                                      # respacing keeps the network's times
    assert r.timestep_map[-1].item() == 999.75 and r.timestep_map.dtype == torch.float32


# --- the released models: every key mapped, every shape equal, nothing left over ----------------------

ADM_MODELS = {  # name: (the published flags as the constructor's arguments), parameters
    "64x64_diffusion.pt": (dict(ch=192, mult=[1, 2, 3, 4], nrb=3, attn_ds=(2, 4, 8), num_classes=1000),
                           295.9),
    "128x128_diffusion.pt": (dict(ch=256, mult=[1, 1, 2, 3, 4], nrb=2, attn_ds=(4, 8, 16), num_classes=1000),
                             421.5),
    "256x256_diffusion.pt": (dict(ch=256, mult=[1, 1, 2, 2, 4, 4], nrb=2, attn_ds=(8, 16, 32),
                                  num_classes=1000), 553.8),
    "256x256_diffusion_uncond.pt": (dict(ch=256, mult=[1, 1, 2, 2, 4, 4], nrb=2, attn_ds=(8, 16, 32)),
                                    552.8),
    "cifar10_uncond_50M_500K.pt": (dict(ch=128, mult=[1, 2, 2, 2], nrb=3, attn_ds=(2, 4), updown=False),
                                   52.5),
}


def meta(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("name", list(ADM_MODELS))
def test_released_model_keys_map_one_to_one(name):
    kw, millions = ADM_MODELS[name]
    shapes, _ = openai_unet_shapes(**kw, out_ch=6)
    tensors = meta(shapes)
    cfg = common.openai_released_config(common.openai_unet_structure(tensors, name), flags(), name)
    assert name in cfg["released"]
    with torch.device("meta"):
        model = common.build_unet(cfg)
    heads_of = lambda c: c // cfg["head_channels"] if cfg["head_channels"] else cfg["heads"]
    assert common.check_mapping(model, common.unet_from_openai(tensors, heads_of, cfg["qkv"])) == ([], [], [])
    assert sum(math.prod(s) for s in shapes.values()) == common.count_params(model)
    assert common.count_params(model) / 1e6 == pytest.approx(millions, abs=0.05)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.num_groups == 32 and m.eps == 1e-5 for m in norms)


@pytest.mark.parametrize("size,depth", [(64, 4), (128, 2), (256, 2)])
def test_released_classifier_keys_map_one_to_one(size, depth):
    mult = {64: [1, 2, 3, 4], 128: [1, 1, 2, 3, 4], 256: [1, 1, 2, 2, 4, 4]}[size]
    attn_ds = tuple(size // r for r in (32, 16, 8))
    shapes, _ = openai_unet_shapes(128, mult, depth, attn_ds, classifier_size=size)
    tensors = meta(shapes)
    blocks = len({k.split(".")[1] for k in tensors if k.startswith("input_blocks.")})
    r = common.OPENAI_CLASSIFIERS[(128, blocks)]
    assert r["files"] == f"{size}x{size}_classifier.pt"
    cfg = dict(num_classes=1000, ch=128, ch_mult=r["ch_mult"], depth=r["depth"], attn_res=[32, 16, 8],
               head_channels=64, image_size=size, channels=3, norm_groups=32, emb_cos_first=True)
    with torch.device("meta"):
        clf = guided.build_classifier(cfg)
    ours = common.classifier_from_openai(tensors, lambda c: c // 64)
    assert common.check_mapping(clf, ours) == ([], [], [])
    assert sum(math.prod(s) for s in shapes.values()) == common.count_params(clf)


def test_unknown_openai_model_names_the_flags_it_needs(tmp_path):
    shapes, _ = openai_unet_shapes(32, [1, 2], 1, (2,))
    path = str(tmp_path / "mine.pt")
    torch.save(random_tensors(shapes), path)
    with pytest.raises(common.UserError, match=r"none of the released ones .*--image-size, --qkv-order, "
                                               r"--heads or --head-channels, --schedule, --timesteps"):
        guided.load_weights(argparse.Namespace(weights=path, **vars(flags())), torch.device("cpu"))
    args = argparse.Namespace(weights=path, **vars(flags(image_size=16, heads=3, qkv_order="legacy",
                                                         schedule="cosine", timesteps=10)))
    with pytest.raises(common.UserError, match=r"widths \[64, 64\] do not split into 3 heads"):
        guided.load_weights(args, torch.device("cpu"))
    cut = {k: v for k, v in random_tensors(shapes).items() if not k.startswith("input_blocks.1.0.emb_layers")}
    torch.save(cut, path)
    with pytest.raises(common.UserError, match="no tensor 'input_blocks.1.0.emb_layers.1.weight'"):
        guided.load_weights(args, torch.device("cpu"))


def test_flags_that_go_with_weights(tmp_path):
    cases = [(["--train", "--weights", "x.pt"], "--train starts from scratch"),
             (["--sample", "--weights", "x.pt", "--ckpt", "c.pt"], "give --weights or --ckpt, not both"),
             (["--sample", "--classifier-weights", "c.pt", "--classifier", "d.pt"],
              "give --classifier-weights or --classifier, not both"),
             (["--sample", "--weights", "x.pt", "--heads", "4", "--head-channels", "64"],
              "give --heads or --head-channels, not both"),
             (["--sample", "--qkv-order", "new"], "--qkv-order goes with --weights"),
             (["--sample", "--schedule", "linear"], "--schedule goes with --train")]
    for argv, message in cases:
        with pytest.raises(common.UserError, match=message):
            guided.main(argv + ["--out", str(tmp_path)])
