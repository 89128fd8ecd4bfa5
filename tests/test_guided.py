"""guided.py: the Gaussian KL and the discretized decoder against closed forms, the learned-variance
interpolation, respacing, the hybrid loss's detached mean, classifier guidance (Algorithms 1 and 2) with an
analytic classifier for two Gaussian classes, ADM's network options, and the command line on tiny models."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import common
import guided

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
f64 = dict(dtype=torch.float64)


@pytest.fixture(scope="module")
def cosine():
    return guided.Diffusion(common.beta_schedule("cosine", 1000))


# --- Gaussians: KL and the decoder -------------------------------------------------------------------

def test_normal_kl_matches_closed_form_and_quadrature():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(20, generator=g, **f64), torch.randn(20, generator=g, **f64)
    s1, s2 = torch.rand(20, generator=g, **f64) + 0.2, torch.rand(20, generator=g, **f64) + 0.2
    kl = guided.normal_kl(m1, 2 * s1.log(), m2, 2 * s2.log())
    closed = torch.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    torch.testing.assert_close(kl, closed, rtol=1e-12, atol=1e-12)
    # the integral of p log(p / q) on a fine grid
    x = torch.linspace(-12, 12, 200_001, **f64)[:, None]
    logp = -0.5 * ((x - m1) / s1) ** 2 - s1.log() - 0.5 * math.log(2 * math.pi)
    logq = -0.5 * ((x - m2) / s2) ** 2 - s2.log() - 0.5 * math.log(2 * math.pi)
    quad = torch.trapezoid(logp.exp() * (logp - logq), x[:, 0], dim=0)
    torch.testing.assert_close(kl, quad, rtol=1e-6, atol=1e-9)
    assert guided.normal_kl(m1, s1, m1, s1).abs().max() == 0  # KL(p || p) = 0


def test_discretized_decoder_matches_normal_cdf_bins_and_sums_to_one():
    levels = -1 + 2 * torch.arange(256, **f64) / 255                       # the 256 pixel values in [-1, 1]
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    for mean, std in [(0.0, 0.1), (0.3, 0.02), (-0.95, 0.05), (1.0, 0.5), (0.2, 1e-3)]:
        logp = guided.discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                          torch.full_like(levels, math.log(std)))
        closed = []
        for x in levels.tolist():
            hi = 1.0 if x > 0.999 else Phi((x + 1 / 255 - mean) / std)      # the end bins reach +-infinity
            lo = 0.0 if x < -0.999 else Phi((x - 1 / 255 - mean) / std)
            closed.append(max(hi - lo, 1e-12))
        closed = torch.tensor(closed, **f64)
        big = closed > 1e-9
        torch.testing.assert_close(logp[big], closed[big].log(), rtol=1e-7, atol=1e-9)
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)      # the bins tile the real line
        assert (logp >= math.log(1e-12) - 1e-9).all()                       # clamped at 1e-12 as in the code
    far = guided.discretized_gaussian_log_likelihood(torch.tensor([-1.0, 0.0], **f64),
                                                     torch.tensor([0.5, 0.9], **f64),
                                                     torch.tensor([math.log(0.05)] * 2, **f64))
    assert far.tolist() == [math.log(1e-12)] * 2


# --- learned variances and respacing -----------------------------------------------------------------

def test_learned_variance_interpolates_between_beta_tilde_and_beta(cosine):
    d = cosine
    t = torch.arange(1, d.T)
    shape = (len(t), 1)
    b, bt = d.betas[1:][:, None], d.post_var[1:][:, None]                  # the float64 schedule
    torch.testing.assert_close(d.learned_logvar(torch.ones(shape, **f64), t).exp(), b, rtol=1e-5, atol=0)
    torch.testing.assert_close(d.learned_logvar(-torch.ones(shape, **f64), t).exp(), bt, rtol=1e-5, atol=0)
    torch.testing.assert_close(d.learned_logvar(torch.zeros(shape, **f64), t).exp(), (b * bt).sqrt(),
                               rtol=1e-5, atol=0)
    t0 = torch.zeros(1, dtype=torch.long)  # beta~_0 = 0: clipped to beta~_1
    small = d.learned_logvar(-torch.ones(1, 1), t0).exp().item()
    assert small == pytest.approx(d.post_var[1].item(), rel=1e-5)
    assert d.learned_logvar(torch.ones(1, 1), t0).exp().item() == pytest.approx(d.betas[0].item(), rel=1e-5)
    # through p_mean_variance: a network output [eps, v] with v = +1 / -1 channels
    x = torch.randn(len(t), 3, 2, 2, **f64)
    for v, want in ((1.0, b), (-1.0, bt)):
        out = torch.cat([torch.randn_like(x), torch.full_like(x, v)], 1)
        p = d.p_mean_variance(None, x, t, clip=False, out=out)
        torch.testing.assert_close(p["logvar"][:, 0, 0, 0].exp(), want[:, 0], rtol=1e-5, atol=0)
    # respaced: the same endpoints, now the respaced process's beta' and beta~'
    r = guided.respace(d, 50)
    tr = torch.arange(1, r.T)
    ones = torch.ones(r.T - 1, 1, **f64)
    torch.testing.assert_close(r.learned_logvar(ones, tr).exp()[:, 0], r.betas[1:], rtol=1e-5, atol=0)
    torch.testing.assert_close(r.learned_logvar(-ones, tr).exp()[:, 0], r.post_var[1:], rtol=1e-5, atol=0)
    assert (r.betas[1:] > d.betas[r.timestep_map[1:]]).all()  # a respaced step covers several original ones


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_respaced_betas_reproduce_alpha_bar_on_the_kept_steps(schedule):
    d = guided.Diffusion(common.beta_schedule(schedule, 1000))
    for S in (1, 2, 3, 10, 25, 50, 100, 250, 999, 1000):
        ts = guided.space_timesteps(1000, S)
        assert len(ts) == S and ts == sorted(set(ts)) and ts[-1] == 999 and (S == 1 or ts[0] == 0)
        r = guided.respace(d, S)
        assert r.T == S and r.timestep_map.tolist() == ts
        torch.testing.assert_close(torch.cumprod(1 - r.betas, 0), d.abar[ts], rtol=1e-12, atol=1e-15)
        # the same marginal q(x_t | x_0) at respaced step i and original step ts[i]
        x0, eps = torch.randn(S, 4), torch.randn(S, 4)
        torch.testing.assert_close(r.q_sample(x0, torch.arange(S), eps),
                                   d.q_sample(x0, torch.tensor(ts), eps))
    torch.testing.assert_close(guided.respace(d, 1000).betas, d.betas, rtol=1e-10, atol=1e-15)
    assert guided.space_timesteps(1000, 3) == [0, 500, 999]
    for bad in (0, 1001):
        with pytest.raises(common.UserError, match="--steps"):
            guided.space_timesteps(1000, bad)


# --- the bound and the hybrid loss -------------------------------------------------------------------

def test_vb_terms_are_zero_for_the_true_posterior_and_the_decoder_nll_at_t0(cosine):
    d = cosine
    torch.manual_seed(0)
    x0 = torch.randint(0, 256, (6, 3, 4, 4)).float() / 127.5 - 1
    t = torch.tensor([0, 1, 5, 100, 500, 999])
    noise = torch.randn_like(x0)
    xt = d.q_sample(x0, t, noise)
    exact = torch.cat([noise, -torch.ones_like(x0)], 1)       # the true eps and v = -1: p_theta = q exactly
    vb = d.vb_terms(exact, x0, xt, t)
    assert vb[1:].abs().max() < 2e-4
    mean, _ = d.q_posterior(x0, xt, t)
    logvar = d.learned_logvar(-torch.ones_like(x0[:1]), t[:1])
    nll = -guided.discretized_gaussian_log_likelihood(x0[:1], mean[:1], 0.5 * logvar).mean() / math.log(2)
    assert vb[0].item() == pytest.approx(nll.item(), rel=1e-5) and vb[0] > 0
    wrong = torch.cat([noise + 0.3, torch.zeros_like(x0)], 1)
    assert (d.vb_terms(wrong, x0, xt, t)[1:] > 1e-4).all()


def test_hybrid_loss_is_lsimple_plus_lambda_vlb_and_the_vlb_term_does_not_train_the_mean(cosine):
    d = cosine
    x0 = torch.randint(0, 256, (8, 3, 4, 4)).float() / 127.5 - 1
    out = torch.randn(8, 6, 4, 4, requires_grad=True)
    model = lambda x, t, y: out
    torch.manual_seed(1)
    loss = d.hybrid_loss(model, x0)
    torch.manual_seed(1)  # the same draws of t and eps
    t = torch.randint(0, d.T, (8,))
    noise = torch.randn_like(x0)
    eps, v = out.chunk(2, 1)
    mse = (noise - eps.detach()).square().flatten(1).mean(1)
    vb = d.vb_terms(out.detach(), x0, d.q_sample(x0, t, noise), t)
    assert loss.item() == pytest.approx((mse + 0.001 * d.T * vb).mean().item(), rel=1e-5)
    loss.backward()
    grad_eps, grad_v = out.grad.chunk(2, 1)
    # L_simple's alone
    torch.testing.assert_close(grad_eps, 2 * (eps.detach() - noise) / noise[0].numel() / 8)
    assert grad_v.abs().sum() > 0  # L_vlb trains v
    fixed = guided.Diffusion(d.betas, "large")
    torch.manual_seed(1)
    simple = fixed.hybrid_loss(lambda x, t, y: eps.detach(), x0).item()
    assert simple == pytest.approx(mse.mean().item(), rel=1e-6)


# --- classifier guidance with an analytic classifier -------------------------------------------------

MU = torch.tensor([[-0.4, -0.4], [0.4, 0.4]])  # two classes N(mu_y, S^2 I) in 2-d, equally likely
S = 0.15


def noisy_class_logits(abar):
    """log p(y | x_t) + const for the two classes: x_t | y ~ N(sqrt(abar_t) mu_y, (abar_t S^2 + 1 - abar_t)
    I)."""
    def f(x, t):
        a = abar[t].float()[:, None, None]
        var = a * S ** 2 + 1 - a
        return -((x[:, None, :] - a.sqrt() * MU[None]) ** 2).sum(-1) / (2 * var[:, :, 0])
    return f


def exact_eps(abar):
    """E[eps | x_t] = -sqrt(1 - abar_t) grad log p(x_t) for the mixture, as a learned-variance output
    [eps, v = 0]."""
    logits = noisy_class_logits(abar)

    def model(x, t, y=None):
        a = abar[t].float()[:, None]
        var = a * S ** 2 + 1 - a
        post = logits(x, t).softmax(-1)                                      # p(y | x_t)
        score = -(post[:, :, None] * (x[:, None, :] - a[:, None].sqrt() * MU[None])).sum(1) / var
        return torch.cat([-(1 - a).sqrt() * score, torch.zeros_like(x)], 1)
    return model


def test_cond_fn_is_the_analytic_gradient_and_the_conditioned_mean_and_score(cosine):
    clf = noisy_class_logits(cosine.abar)
    torch.manual_seed(0)
    x, t = torch.randn(64, 2), torch.randint(0, 1000, (64,))
    y = torch.randint(0, 2, (64,))
    g = guided.cond_fn(clf, x, t, y, scale=3.0)
    a = cosine.abar[t].float()[:, None]
    var = a * S ** 2 + 1 - a
    post = clf(x, t).softmax(-1)
    d = lambda k: -(x - a.sqrt() * MU[k]) / var                            # grad log N(x; sqrt(a) mu_k, var)
    asked = torch.stack([d(int(yi))[i] for i, yi in enumerate(y)])
    analytic = asked - (post[:, :1] * d(0) + post[:, 1:] * d(1))
    torch.testing.assert_close(g, 3.0 * analytic, rtol=1e-4, atol=1e-5)
    assert not x.requires_grad
    lv = torch.full_like(x, math.log(0.2))
    torch.testing.assert_close(guided.condition_mean(x, lv, g), x + 0.2 * g)
    torch.testing.assert_close(guided.condition_score(x, a, g), x - (1 - a).sqrt() * g)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_guidance_moves_samples_toward_the_class(cosine, sampler):
    r = guided.respace(guided.Diffusion(cosine.betas, device="cpu"), 50)  # float32, as the scripts sample
    clf, model = noisy_class_logits(cosine.abar), exact_eps(cosine.abar)  # both at the ORIGINAL timesteps
    n = 2000
    y = torch.ones(n, dtype=torch.long)
    frac = {}
    for scale in (0.0, 0.5, 1.0, 4.0):
        torch.manual_seed(0)
        x, _ = r.sample(model, (n, 2), "cpu", clip=False, guide=guided.make_guide(clf, y, scale),
                        sampler=sampler)
        frac[scale] = ((x - MU[0]).norm(dim=1) > (x - MU[1]).norm(dim=1)).float().mean().item()
        if scale == 0:
            assert frac[0.0] == pytest.approx(0.5, abs=0.05)  # both classes, unguided
            assert x.std(0).mean().item() == pytest.approx((S ** 2 + 0.4 ** 2) ** 0.5, rel=0.1)
        if scale == 1.0:
            # scale 1 with the exact classifier is the exact conditional score: samples ~ N(mu_1, S^2 I)
            torch.testing.assert_close(x.mean(0), MU[1], atol=0.03, rtol=0)
            assert x.std(0).mean().item() == pytest.approx(S, rel=0.15)
    assert frac[0.0] < frac[0.5] < frac[1.0] <= frac[4.0] and frac[1.0] > 0.97


# --- the networks ------------------------------------------------------------------------------------

def test_adm_unet_options_and_classifier():
    c = dict(guided.PRESETS["tiny"], out_ch=6)
    net = common.build_unet(c)
    blocks = [m for m in net.modules() if isinstance(m, common.ResBlock)]
    # AdaGN; no 1/sqrt(2), as ADM
    assert all(b.scale_shift and not b.skip_rescale for b in blocks)
    assert any(b.down for b in blocks) and any(b.up for b in blocks)                 # BigGAN up/down blocks
    attn = [m for m in net.modules() if isinstance(m, common.AttnBlock)]
    assert attn and all(a.attn.heads == a.norm.num_channels // c["head_channels"] for a in attn)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 99])
    assert net(x, t).shape == (2, 6, 16, 16)                                         # [eps, v]
    clf = guided.build_classifier(guided.classifier_config(c, 4))
    logits = clf(x, t)
    assert logits.shape == (2, 4)
    g = guided.cond_fn(clf, x, t, torch.tensor([1, 3]), 1.0)
    assert g.shape == x.shape and g.abs().sum() > 0
    rescaled = dict(c, skip_rescale=True)  # the option ADM's Table 1 ablates
    assert all(b.skip_rescale for b in common.build_unet(rescaled).modules()
               if isinstance(b, common.ResBlock))
    clf = guided.build_classifier(guided.classifier_config(rescaled, 4))
    assert all(b.skip_rescale for b in clf.modules() if isinstance(b, (common.ResBlock, common.AttnBlock)))
    # the paper preset is ADM's ImageNet-64 network: ~296M parameters (class-conditional, learned sigmas)
    with torch.device("meta"):
        big = common.build_unet(dict(guided.PRESETS["paper"], out_ch=6, num_classes=1000))
    assert 295e6 < common.count_params(big) < 297e6


# --- the command line --------------------------------------------------------------------------------

def test_cli_train_resume_sample_and_eval(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the judge is cached in ./out/judge
    run = str(tmp_path / "run")
    base = ["--train", "--preset", "tiny", "--max-steps", "4", "--n-samples", "4", "--steps", "5"]
    guided.main(base + ["--clf-steps", "4", "--out", run])
    ck = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    cl = torch.load(os.path.join(run, "classifier.pt"), weights_only=True)
    assert ck["kind"] == "diffusion" and ck["config"]["out_ch"] == 6 and ck["step"] == 4
    assert cl["kind"] == "classifier" and cl["step"] == 4 and cl["config"]["num_classes"] == 4
    assert 0 <= cl["accuracy"]["t0"] <= 1
    # the classifier resumes exactly: a run stopped after its step-2 checkpoint, then --resume
    part = str(tmp_path / "part")
    monkeypatch.setitem(guided.PRESETS["tiny"], "ckpt_every", 2)
    save = common.save_checkpoint

    def save_then_crash(obj, path):
        save(obj, path)
        if obj.get("kind") == "classifier" and obj["step"] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(common, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        guided.main(base + ["--clf-steps", "4", "--out", part])
    assert torch.load(os.path.join(part, "classifier.pt"), weights_only=True)["step"] == 2
    guided.main(base + ["--clf-steps", "4", "--out", part, "--resume"])
    cp = torch.load(os.path.join(part, "classifier.pt"), weights_only=True)
    assert cp["step"] == 4 and all(torch.equal(cp["model"][k], cl["model"][k]) for k in cl["model"])

    guided.main(["--sample", "--out", run, "--class", "2", "--scale", "2", "--steps", "5",
                 "--n-samples", "4"])
    assert Image.open(os.path.join(run, "samples.png")).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    assert Image.open(os.path.join(run, "reverse.gif")).n_frames == 5
    guided.main(["--sample", "--out", run, "--sampler", "ddim", "--steps", "4", "--n-samples", "8"])
    # one class per column
    assert Image.open(os.path.join(run, "samples.png")).size == (4 * 18 + 2, 2 * 18 + 2)
    capsys.readouterr()
    guided.main(["--eval", "--out", run, "--scale", "1", "--steps", "3", "--n-samples", "8",
                 "--batch-size", "4"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["script"] == "guided" and res["scale"] == 1 and res["nfe"] == 3 and 0 <= res["acc"] <= 1
    assert math.isfinite(res["fid"])


@pytest.mark.parametrize("args, msg", [
    (["--sample", "--scale", "-1"], "--scale"),
    (["--sample", "--class", "-2"], "--class"),
    (["--sample", "--class", "4"], "use 0..3"),
    (["--sample", "--class", "1", "--scale", "0"], "unconditional"),
    (["--sample", "--steps", "101"], "--steps 101"),
    (["--sample", "--eta", "0.5"], "--sampler ddim"),
    (["--eval", "--class", "1"], "--class goes with --sample"),
    (["--sample", "--sweep"], "--sweep goes with --eval"),
    (["--eval", "--scales", "1", "2"], "goes with --eval --sweep"),
    (["--eval", "--sweep", "--scales", "-1"], "--scales -1: use a number >= 0"),
    (["--sample", "--var", "learned", "--ckpt", "{fixed}"], "fixed variances"),
    (["--sample", "--ckpt", "{run}/classifier.pt"], "not the diffusion model"),
    (["--sample", "--classifier", "{run}/ckpt.pt"], "not the classifier"),
    (["--sample", "--classifier", "{run}/nope.pt"], "does not exist"),
])
def test_bad_input_is_a_user_error(tmp_path_factory, args, msg):
    root = tmp_path_factory.getbasetemp() / "bad_input"
    run, fixed = root / "run", root / "fixed"
    if not (run / "classifier.pt").exists():
        tiny = ["--train", "--preset", "tiny", "--max-steps", "2", "--n-samples", "2", "--steps", "2"]
        guided.main(tiny + ["--clf-steps", "2", "--out", str(run)])
        guided.main(tiny + ["--clf-steps", "0", "--var", "large", "--out", str(fixed)])
    args = [a.format(run=run, fixed=fixed / "ckpt.pt") for a in args]
    with pytest.raises(common.UserError, match=msg):
        guided.main(args + (["--out", str(run)] if "--ckpt" not in args else []) + ["--n-samples", "2"])


def test_cli_bad_input_is_one_line_on_stderr(tmp_path):
    p = subprocess.run([sys.executable, "guided.py", "--sample", "--scale", "-0.5", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: --scale")
    assert len(p.stderr.strip().splitlines()) == 1
