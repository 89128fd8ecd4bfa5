"""ldm.py: the KL autoencoder's shapes (f = 4 and 8) and KL against the closed form, the adaptive GAN weight,
cross-attention (changes with the context, ignores padded tokens), classifier-free guidance at s = 0 and 1,
the tokenizer, the measured latent scale, and the command line on tiny models (both stages, then sampling)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import common
import ldm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a small red circle on the left", "a large blue triangle on the right",
            "a small white cross in the center"]


def jitter(module, std=0.1, seed=0):
    """Perturb every weight, so the zero-initialized output layers do not hide what the inputs do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_cfg(cond="text", **kw):
    cfg = dict(ldm.PRESETS["tiny"], cond=cond, **kw)
    if cond == "text":
        cfg["vocab"] = common.WordTokenizer.build(CAPTIONS, cfg["max_len"]).vocab
    else:
        cfg["num_classes"] = 4
    return cfg


# --- stage 1 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("f, side", [(4, 8), (8, 4)])
def test_autoencoder_shapes(f, side):
    acfg = ldm.ae_config(dict(ldm.PRESETS["tiny"], image_size=32, f=f))
    ae = common.AutoencoderKL(acfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    post = ldm.DiagonalGaussian(*ae.encode(x))
    assert post.mean.shape == post.logvar.shape == (2, acfg["z_ch"], side, side)   # 32x32x3 -> (32/f)^2 x 4
    assert post.sample().shape == (2, 4, side, side) and post.kl().shape == (2,)
    rec, _ = ldm.reconstruct(ae, x)
    assert rec.shape == x.shape and ae.decode(torch.randn(3, 4, side, side)).shape == (3, 3, 32, 32)
    big = ldm.DiagonalGaussian(*common.gaussian_moments(torch.cat([torch.zeros(1, 4, 2, 2),
                                                                   torch.full((1, 4, 2, 2), 1e3)], 1)))
    # log-variance clamped to [-30, 20]
    assert big.logvar.max() == 20 and torch.isfinite(big.kl()).all()
    assert common.gaussian_moments(torch.full((1, 8, 2, 2), -1e3))[1].min() == -30
    # the mid blocks of the encoder and the decoder attend over all positions (the released design)
    assert all(isinstance(m.mid[1], common.AttnBlock) for m in (ae.encoder, ae.decoder))


def test_kl_matches_closed_form_and_samples_have_the_posterior_moments():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    std = (0.5 * logvar).exp()
    closed = (-std.log() + (std ** 2 + mean ** 2) / 2 - 0.5).flatten(1).sum(1)   # KL(N(m, s^2) || N(0, 1))
    torch.testing.assert_close(ldm.kl_loss(mean, logvar), closed, rtol=1e-12, atol=1e-12)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                            torch.distributions.Normal(torch.zeros_like(mean),
                                                                       torch.ones_like(std)))
    torch.testing.assert_close(ldm.kl_loss(mean, logvar), ref.flatten(1).sum(1))
    assert ldm.kl_loss(torch.zeros(2, 4), torch.zeros(2, 4)).abs().max() == 0   # KL(N(0, 1) || N(0, 1)) = 0
    post = ldm.DiagonalGaussian(mean[:1].float().expand(20000, -1, -1, -1),
                                logvar[:1].float().expand(20000, -1, -1, -1))
    z = post.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(z.mean(0), mean[0].float(), atol=0.1, rtol=0)
    torch.testing.assert_close(z.std(0) / std[0].float(), torch.ones_like(z[0]), atol=0.05, rtol=0)


def test_adaptive_weight_is_the_gradient_norm_ratio_and_hinge_loss():
    w = torch.zeros(3, requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    # grads a (norm 5) and b (norm 1)
    lam = ldm.adaptive_weight((w * a).sum(), (w * b).sum(), w, 0.5)
    assert abs(lam.item() - 0.5 * 5 / (1 + 1e-4)) < 1e-5 and not lam.requires_grad
    assert ldm.adaptive_weight((w * a).sum(), (w * 0).sum(), w, 1.0).item() == 1e4  # clamped
    d = ldm.hinge_d_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5]))
    # 1/2 (mean relu(1-r) + mean relu(1+f))
    assert abs(d.item() - 0.5 * (0.5 + 0.75)) < 1e-6


def test_ae_losses_and_one_step_with_the_discriminator():
    acfg = ldm.ae_config(dict(ldm.PRESETS["tiny"]))
    torch.manual_seed(0)
    ae, disc = common.AutoencoderKL(acfg), ldm.PatchDiscriminator(3, acfg["disc_ch"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss, rec, logs = ldm.ae_losses(ae, x, acfg, disc, use_gan=True)
    assert torch.isfinite(loss) and rec.shape == x.shape and {"rec", "kl", "g", "w"} <= logs.keys()
    loss.backward()
    assert ae.decoder.conv_out.weight.grad is not None
    # s of L_AE is the official constant (its logvar is never trained): no parameter of the autoencoder
    # holds it
    assert ldm.LOG_SCALE == 0.0 and not any("logvar" in k for k in ae.state_dict())
    torch.manual_seed(1)
    nll_only = ldm.ae_losses(ae, x, dict(acfg, kl_weight=0.0))
    torch.manual_seed(1)
    rec2 = ldm.reconstruct(ae, x)[0]
    torch.testing.assert_close(nll_only[0], (x - rec2).abs().sum() / 2)   # sum |x - x~| / e^0 + 0, per image


# --- conditioning -------------------------------------------------------------------------------------

def test_tokenizer_round_trips_known_words_and_maps_unknown_ones_to_one_id():
    tok = common.WordTokenizer.build(CAPTIONS, max_len=10)
    assert all(isinstance(w, str) for w in tok.vocab) and tok.vocab[:3] == ["<pad>", "<bos>", "<unk>"]
    for c in CAPTIONS:
        ids = tok.encode(c)
        assert ids[0] == tok.BOS and tok.UNK not in ids and tok.decode(ids) == c
    ids = tok.encode("A Huge red zebra!")
    assert ids == [tok.BOS, tok.index["a"], tok.UNK, tok.index["red"], tok.UNK]
    assert tok.decode(ids) == "a <unk> red <unk>" and tok.unknown("a huge red zebra") == ["huge", "zebra"]
    batch = tok(["", CAPTIONS[0], "a " * 30])
    # empty caption = [<bos>]
    assert batch.shape == (3, 10) and batch[0].tolist() == [tok.BOS] + [tok.PAD] * 9
    assert (batch[2] != tok.PAD).all()                                                  # cut to max_len
    # rebuilt from the stored list
    again = common.WordTokenizer(tok.vocab, 10)
    assert again.vocab == tok.vocab and again.encode(CAPTIONS[1]) == tok.encode(CAPTIONS[1])
    # a word appended keeps every earlier id
    more = common.WordTokenizer(tok.vocab + ["sks"], 10)
    assert more.vocab[:-1] == tok.vocab and more.index["sks"] == len(tok.vocab)


def test_partial_captions_keep_the_shape_and_the_phrases_asked():
    cap = "a small red circle on the left"
    assert ldm.partial_caption(cap, [True, True, True]) == cap
    assert ldm.partial_caption(cap, [False, False, False]) == "a circle"
    assert ldm.partial_caption(cap, [False, True, True]) == "a red circle on the left"
    partial = ldm.partial_caption("a large blue triangle in the center", [True, False, False])
    assert partial == "a large triangle"
    # not a shapes caption
    assert ldm.partial_caption("a dog on a mat", [False, False, False]) == "a dog on a mat"
    # what a partial caption names is a subset of the full one, and the shape is always there
    for c in CAPTIONS:
        for keep in ([a, b, d] for a in (0, 1) for b in (0, 1) for d in (0, 1)):
            a, full = common.parse_caption(ldm.partial_caption(c, keep)), common.parse_caption(c)
            assert a.items() <= full.items() and a["shape"] == full["shape"] and len(a) == 1 + sum(keep)


def test_cross_attention_changes_with_context_and_ignores_padded_tokens():
    torch.manual_seed(0)
    blk = jitter(common.SpatialTransformer(16, 2, context_dim=8)).eval()
    x, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    out = blk(x, ctx, mask)
    pad = ctx.clone()
    pad[0, 3:] = torch.randn(2, 8) * 10                                   # only sample 0's padded tokens
    torch.testing.assert_close(blk(x, pad, mask), out, rtol=0, atol=1e-6)
    real = ctx.clone()
    real[0, 1] += 1.0                                                     # a real token
    assert (blk(x, real, mask)[0] - out[0]).abs().max() > 1e-3
    torch.testing.assert_close(blk(x, real, mask)[1], out[1])
    # the whole latent U-Net and text encoder: padding changes nothing, a different caption does
    cfg = tiny_cfg()
    model = jitter(common.LDM(cfg)).eval()
    tok = common.WordTokenizer(cfg["vocab"], cfg["max_len"])
    z, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 500])
    e = model(z, t, tok(CAPTIONS[:2]))
    ctx, m = model.context(tok(CAPTIONS[:2]))
    ctx2 = torch.where(m[..., None], ctx, torch.randn_like(ctx))
    torch.testing.assert_close(model.unet(z, t, context=ctx2, mask=m), e, rtol=0, atol=1e-5)
    assert (model(z, t, tok(CAPTIONS[1:3])) - e).abs().max() > 1e-3
    long = common.WordTokenizer(cfg["vocab"], 8)                                 # same caption, less padding
    torch.testing.assert_close(model.text(long(CAPTIONS[:1]))[0][0, :8][m[0, :8]], ctx[0, :8][m[0, :8]],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("cond", ["text", "class"])
def test_cfg_scale_one_is_conditional_and_zero_unconditional(cond):
    torch.manual_seed(0)
    ec, eu = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(common.cfg_eps(ec, eu, 1.0), ec)
    torch.testing.assert_close(common.cfg_eps(ec, eu, 0.0), eu)
    torch.testing.assert_close(common.cfg_eps(ec, eu, 3.0), 3 * ec - 2 * eu)
    cfg = tiny_cfg(cond)
    model = jitter(common.LDM(cfg)).eval()
    cd = ldm.Conditioner(cfg)
    c = cd(CAPTIONS[:2]) if cond == "text" else cd(labels=[1, 3])
    null = cd.null(2)
    z = torch.randn(2, 4, 4, 4)
    t = torch.full((2,), 300)
    with torch.no_grad():
        e_c, e_u = model(z, t, c), model(z, t, null)
        assert (e_c - e_u).abs().max() > 1e-3
        torch.testing.assert_close(common.guided_eps_fn(model, c, null, 1.0)(z, 300), e_c)
        torch.testing.assert_close(common.guided_eps_fn(model, c, null, 0.0)(z, 300), e_u)
        # s = 1 and s = 0 through the batched (cond, uncond) call as well
        for s, want in [(1.0, e_c), (0.0, e_u), (5.0, e_u + 5 * (e_c - e_u))]:
            got = common.guided_eps_fn(model, c, null, s + 1e-12 if s in (0, 1) else s)(z, 300)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_condition_is_dropped_to_the_null_condition():
    cd = ldm.Conditioner(tiny_cfg())
    c = cd(CAPTIONS[:1] * 10000)
    torch.manual_seed(0)
    d = cd.drop(c, 0.1)
    null = (d == cd.null(1)).all(1)
    assert abs(null.float().mean().item() - 0.1) < 0.01 and (d[~null] == c[~null]).all()
    assert (cd.drop(c[:5], 1.0) == cd.null(5)).all() and (cd.drop(c[:5], 0.0) == c[:5]).all()
    cc = ldm.Conditioner(tiny_cfg("class"))
    assert (cc.drop(cc(labels=[0, 1, 2]), 1.0) == 4).all()                # the null class is num_classes


def test_ddim_step_recovers_z0_with_the_true_noise():
    abar = ldm.alphas_cumprod(ldm.PRESETS["tiny"])
    assert abar[-1] < 1e-3 and abar[0] > 0.998                           # scaled_linear 0.0015 .. 0.0195
    z0, eps = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64)
    t = torch.tensor([700, 700])
    zt = ldm.q_sample(z0, t, eps, abar)
    torch.testing.assert_close(common.ddim_latent_step(zt, eps, abar[700].item(), 1.0), z0, rtol=1e-5,
                               atol=1e-5)
    # eta = 0 stays on the same (z0, eps)
    z_s = common.ddim_latent_step(zt, eps, abar[700].item(), abar[300].item())
    torch.testing.assert_close(z_s, ldm.q_sample(z0, torch.tensor([300, 300]), eps, abar), rtol=1e-5,
                               atol=1e-5)


def test_latent_scale_is_one_over_the_measured_std():
    acfg = ldm.ae_config(dict(ldm.PRESETS["tiny"]))
    torch.manual_seed(0)
    ae = common.AutoencoderKL(acfg).eval()
    data = common.ShapesData(16)
    s = ldm.measure_scale(ae, data, torch.device("cpu"), 20, batch=8, seed=3)
    with torch.no_grad():
        x = torch.stack([data[i][0] for i in range(20)])
        z = torch.cat([ldm.DiagonalGaussian(*ae.encode(x[i:i + 8])).sample(g)
                       for g in [torch.Generator().manual_seed(3)] for i in range(0, 20, 8)])
    assert abs(s - 1 / z.std().item()) < 1e-5 and abs((z * s).std().item() - 1) < 1e-5


# --- the command line ---------------------------------------------------------------------------------

def test_cli_train_both_stages_then_sample_and_eval(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the judge is cached in ./out/judge
    run = str(tmp_path / "run")
    ldm.main(["--train", "--preset", "tiny", "--max-steps", "4", "--ae-steps", "6", "--n-samples", "4",
              "--steps", "3", "--out", run])
    ae_ck = torch.load(os.path.join(run, "ae.pt"), weights_only=True)
    ck = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    assert ae_ck["kind"] == "autoencoder" and ae_ck["step"] == 6 and math.isfinite(ae_ck["psnr"])
    assert ck["kind"] == "ldm" and ck["step"] == 4 and ck["config"]["cond"] == "text"
    assert "circle" in ck["config"]["vocab"] and all(isinstance(w, str) for w in ck["config"]["vocab"])
    assert all(torch.equal(ck["ae"][k], ae_ck["model"][k]) for k in ae_ck["model"])
    # the stored scale is 1/std of posterior samples of the training data, measured as measure_scale does
    ae, _, _ = common.load_ae(os.path.join(run, "ae.pt"))
    s = ldm.measure_scale(ae, common.load_data("shapes", 16, 3), torch.device("cpu"), ck["config"]["scale_n"])
    assert abs(ck["config"]["scale_factor"] - s) < 1e-5
    # the training grid: held-out captions spread over the 4 shapes, one row per shape (4 x 1 here)
    assert Image.open(os.path.join(run, "samples.png")).size == (1 * 18 + 2, 4 * 18 + 2)
    captions = open(os.path.join(run, "samples.txt")).read().splitlines()
    shapes = [common.parse_caption(c)["shape"] for c in captions]
    assert shapes == common.SHAPES
    # stage 2 resumes exactly from its checkpoint (with its own copy of the autoencoder)
    part = tmp_path / "part"
    part.mkdir()
    (part / "ae.pt").write_bytes(open(os.path.join(run, "ae.pt"), "rb").read())
    base = ["--train", "--preset", "tiny", "--n-samples", "1", "--steps", "1", "--out", str(part)]
    ldm.main(base + ["--max-steps", "2"])
    ldm.main(base + ["--max-steps", "4", "--resume"])
    cp = torch.load(part / "ckpt.pt", weights_only=True)
    assert cp["step"] == 4 and all(torch.equal(cp["ema"][k], ck["ema"][k]) for k in ck["ema"])
    ldm.main(["--sample", "--out", run, "--prompt", "a large blue triangle on the right", "--scale", "3",
              "--steps", "3", "--n-samples", "4"])
    assert Image.open(os.path.join(run, "samples.png")).size == (2 * 18 + 2, 2 * 18 + 2)
    # samples.txt beside the grid names this grid's prompts, not the training run's held-out captions
    captions = open(os.path.join(run, "samples.txt")).read().splitlines()
    assert captions == ["a large blue triangle on the right"] * 4
    ldm.main(["--sample", "--out", run, "--prompt", "a blue zebra", "--sampler", "ddpm", "--steps", "4",
              "--n-samples", "2"])
    assert "zebra" in capsys.readouterr().err                             # unknown words: a warning
    ldm.main(["--eval", "--out", run, "--scale", "2", "--steps", "2", "--n-samples", "8",
              "--batch-size", "4"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["script"] == "ldm" and res["scale"] == 2 and res["nfe"] == 4 and 0 <= res["acc"] <= 1
    assert math.isfinite(res["fid"])


@pytest.mark.parametrize("args, msg", [
    (["--sample", "--scale", "-1"], "--scale"),
    (["--train", "--prompt", "a red circle"], "--prompt goes with --sample"),
    (["--sample", "--prompt", "zebra unicorn"], "no word the model knows"),
    (["--sample", "--class", "1"], "text-conditional"),
    (["--sample", "--steps", "1001"], "--steps 1001"),
    (["--sample", "--ckpt", "{run}/ae.pt"], "autoencoder checkpoint, not the latent"),
    (["--sample", "--ckpt", "{run}/nope.pt"], "not found"),
    (["--eval", "--recon", "--ae", "{run}/nope.pt"], "not found"),
    (["--sample", "--recon"], "--recon goes with --eval"),
    (["--train", "--preset", "tiny", "--image-size", "32", "--f", "8", "--max-steps", "1"],
     "has image_size 16 but 32"),
    (["--train", "--preset", "tiny", "--f", "8"],
     "with --f 8: the preset's attention at 4px never occurs .* use --f 4"),
])
def test_bad_input_is_a_user_error(tmp_path_factory, args, msg):
    run = tmp_path_factory.getbasetemp() / "ldm_bad_input"
    if not (run / "ckpt.pt").exists():
        ldm.main(["--train", "--preset", "tiny", "--max-steps", "1", "--ae-steps", "1", "--n-samples", "1",
                  "--steps", "1", "--out", str(run)])
    args = [a.format(run=run) for a in args]
    with pytest.raises(common.UserError, match=msg):
        ldm.main(args + (["--out", str(run)] if "--ckpt" not in args else []) + ["--n-samples", "2"])


def test_cli_bad_input_is_one_line_on_stderr(tmp_path):
    p = subprocess.run([sys.executable, "ldm.py", "--sample", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: checkpoint")
    assert len(p.stderr.strip().splitlines()) == 1
