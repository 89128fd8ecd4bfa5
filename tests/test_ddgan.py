"""ddgan.py: the discretised VP schedule, posterior sampling against closed forms, R1 against finite
differences, what the discriminator sees, training steps, divergence handling and the command line."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
import ddgan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ddgan.PRESETS["tiny"]


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_is_the_discretised_vp_sde():
    s = ddgan.Schedule()                                   # defaults: T = 4, beta_min 0.1, beta_max 20
    assert s.T == 4 == ddgan.PRESETS["cpu"]["timesteps"] == ddgan.PRESETS["paper"]["timesteps"]
    assert len(s.betas) == 5 and s.betas[0].item() == pytest.approx(1e-8)
    t = [1e-3 + i / 4 * (1 - 1e-3) for i in range(5)]
    for i in range(1, 5):  # beta_i = 1 - exp(-int_{t_{i-1}}^{t_i} beta(s) ds), beta(s) = 0.1 + 19.9 s
        integral = 0.1 * (t[i] - t[i - 1]) + 0.5 * 19.9 * (t[i] ** 2 - t[i - 1] ** 2)
        assert s.betas[i].item() == pytest.approx(1 - math.exp(-integral), rel=1e-12)
    abar = s.a_cum ** 2
    assert (abar[1:] < abar[:-1]).all() and abar[-1].item() == pytest.approx(
        math.exp(-0.5 * 19.9 * (1 - 1e-6) - 0.1 * (1 - 1e-3)), rel=1e-6)  # abar(1) / abar(1e-3)
    assert torch.allclose(s.sigma_cum ** 2 + abar, torch.ones(5, dtype=torch.float64))
    one = ddgan.Schedule(1)                                # a one-step GAN: x_1 is (almost) pure noise
    assert (one.a_cum[-1] ** 2).item() < 1e-4
    with pytest.raises(common.UserError):
        ddgan.Schedule(0)


def test_posterior_sampling_matches_closed_forms():
    s = ddgan.Schedule(4)
    torch.manual_seed(0)
    N = 200_000
    for i in range(4):
        t = torch.full((N,), i)
        x0, xt1 = torch.full((N, 1), 0.3, dtype=torch.float64), torch.full((N, 1), -0.7, dtype=torch.float64)
        x = s.sample_posterior(x0, xt1, t)
        b = s.betas[1:]
        abar = torch.cumprod(1 - b, 0)
        prev = abar[i - 1] if i else torch.tensor(1.0, dtype=torch.float64)
        mean = (b[i] * prev.sqrt() / (1 - abar[i]) * 0.3
                + (1 - prev) * (1 - b[i]).sqrt() / (1 - abar[i]) * -0.7).item()
        var = (b[i] * (1 - prev) / (1 - abar[i])).item()
        assert x.mean().item() == pytest.approx(mean, abs=4e-3)
        assert x.var().item() == pytest.approx(var, rel=2e-2, abs=1e-9)
        if i == 0:                                         # no noise at the last step: x_0 = x_0'
            assert torch.allclose(x, x0, atol=1e-6)
    # Bayes consistency: x_{t+1} ~ q(. | x_0), then x_t ~ q(x_t | x_{t+1}, x_0) is distributed as q(x_t | x_0)
    x0 = torch.full((N, 1), 0.5)
    for i in range(1, 4):
        t = torch.full((N,), i)
        _, xt1 = s.q_sample_pairs(x0, t)
        x = s.sample_posterior(x0, xt1, t)
        assert x.mean().item() == pytest.approx(0.5 * s.a_cum[i].item(), abs=5e-3)
        assert x.var().item() == pytest.approx(s.sigma_cum[i].item() ** 2, rel=2e-2)
        assert xt1.var().item() == pytest.approx(s.sigma_cum[i + 1].item() ** 2, rel=2e-2)


def _fd_penalty(f, x, gamma, h=1e-6):
    """gamma/2 * mean over the batch of ||grad f||^2 by central differences (f: per-sample outputs)."""
    g = torch.zeros_like(x)
    flat, gf = x.view(-1), g.view(-1)
    for j in range(flat.numel()):
        old = flat[j].item()
        flat[j] = old + h
        up = f(x).sum()
        flat[j] = old - h
        down = f(x).sum()
        flat[j] = old
        gf[j] = (up - down) / (2 * h)
    return gamma / 2 * g.square().flatten(1).sum(1).mean()


def test_r1_equals_finite_differences():
    torch.manual_seed(0)
    toy = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 1)).double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    r1 = ddgan.r1_penalty(toy(x).squeeze(1), x, 0.7)
    with torch.no_grad():
        fd = _fd_penalty(lambda v: toy(v).squeeze(1), x.detach().clone(), 0.7)
    assert r1.item() == pytest.approx(fd.item(), rel=1e-6)
    # and the real discriminator (without the batch-coupling stddev layer), on one pair
    cfg = {**TINY, "image_size": 4, "channels": 1, "d_ch": 4, "d_mult": [1, 2]}
    D = ddgan.Discriminator(cfg, mbstd=False).double()
    for p in D.parameters():
        nn.init.normal_(p, std=0.3)
    xt, t = torch.randn(1, 1, 4, 4, dtype=torch.float64), torch.tensor([2])
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    r1 = ddgan.r1_penalty(D(x, xt, t), x, 0.02)
    with torch.no_grad():
        fd = _fd_penalty(lambda v: D(v, xt, t), x.detach().clone(), 0.02)
    assert r1.item() > 0 and r1.item() == pytest.approx(fd.item(), rel=1e-5)


def test_discriminator_sees_the_pair_on_channels_and_t():
    torch.manual_seed(0)
    D = ddgan.Discriminator(TINY)
    assert D.conv_in.in_channels == 2 * TINY["channels"]
    for p in D.parameters():  # the zero-initialised convs would hide t at init
        nn.init.normal_(p, std=0.2)
    seen = {}
    D.conv_in.register_forward_pre_hook(lambda m, a: seen.update({"in": a[0]}) if "in" not in seen else None)
    xp, xt = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    out = D(xp, xt, torch.zeros(4, dtype=torch.long))
    assert out.shape == (4,) and torch.equal(seen["in"], torch.cat([xp, xt], 1))
    assert not torch.allclose(out, D(xp, xt, torch.full((4,), 3)))          # depends on t
    assert not torch.allclose(out, D(xp, xt.roll(1, 0), torch.zeros(4, dtype=torch.long)))  # and on x_t
    # blur_down is the normalised [1,3,3,1] FIR before stride 2: constants stay constant, size halves
    y = ddgan.blur_down(torch.full((1, 2, 8, 8), 3.0))
    assert y.shape == (1, 2, 4, 4) and torch.allclose(y[..., 1:-1, 1:-1], torch.tensor(3.0))


class Recorder(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.D, self.calls = D, []

    def forward(self, xp, xt, t):
        self.calls.append((xp.detach().clone(), xt.detach().clone(), t.clone()))
        return self.D(xp, xt, t)


def test_train_steps_change_both_networks_and_stay_finite():
    torch.manual_seed(0)
    cfg = TINY
    G, D = ddgan.Generator(cfg), ddgan.Discriminator(cfg)
    rec = Recorder(D)
    opt_g = common.make_optimizer(G.parameters(), cfg["lr"], betas=(0.5, 0.9))
    opt_d = common.make_optimizer(D.parameters(), cfg["lr_d"], betas=(0.5, 0.9))
    g0 = {k: v.clone() for k, v in G.state_dict().items()}
    d0 = {k: v.clone() for k, v in D.state_dict().items()}
    sched = ddgan.schedule_from(cfg, "cpu")
    data = common.load_data("shapes", 16, 3)
    x, _, _ = next(common.batches(data, 8, 0))
    r1s = []
    for step in range(4):
        rec.calls.clear()
        ld, lg, r1 = ddgan.train_step(G, rec, opt_g, opt_d, sched, x, cfg, step)
        assert all(math.isfinite(v.item()) for v in (ld, lg, r1))
        r1s.append(r1.item())
        (rp, rt, t1), (fp, ft, t2), (gp, gt, t3) = rec.calls      # real, fake (D step), fake (G step)
        assert torch.equal(rt, ft) and torch.equal(t1, t2)        # same x_t and t for the real and fake pair
        assert t1.min() >= 0 and t1.max() < sched.T and rp.shape == x.shape
        assert not torch.equal(rp, fp)
    assert r1s[0] > 0 and r1s[1] == 0 and r1s[3] > 0             # lazy R1 every lazy_reg = 3 steps
    assert any(not torch.equal(v, G.state_dict()[k]) for k, v in g0.items())
    assert any(not torch.equal(v, D.state_dict()[k]) for k, v in d0.items())
    assert common.all_finite(G) and common.all_finite(D)
    with torch.no_grad():
        out, traj = ddgan.sample(G, sched, 3, (3, 16, 16), "cpu")
    assert out.shape == (3, 3, 16, 16) and len(traj) == sched.T + 1 and out.abs().max() <= 1


def test_sampler_makes_exactly_T_generator_calls():
    cfg = {**TINY, "timesteps": 3}
    G = ddgan.Generator(cfg)
    calls = []
    G.register_forward_hook(lambda m, a, o: calls.append(a[1].tolist()))
    ddgan.sample(G, ddgan.schedule_from(cfg, "cpu"), 2, (3, 16, 16), "cpu")
    assert calls == [[2, 2], [1, 1], [0, 0]]


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    calls = {"n": 0}
    real = ddgan.generator_loss

    def nan_after_12(d_fake):
        calls["n"] += 1
        loss = real(d_fake)
        return loss * float("nan") if calls["n"] > 12 else loss

    monkeypatch.setattr(ddgan, "generator_loss", nan_after_12)
    with pytest.raises(common.UserError, match="diverged.*kept"):
        ddgan.main(["--train", "--preset", "tiny", "--out", out, "--max-steps", "30"])
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["step"] == 10  # written at step 10 (ckpt_every 10); the NaN at step 13 is caught by step 15
    assert all(torch.isfinite(v).all() for part in ("G", "D", "ema") for v in ck[part].values())
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def run(*args, check=True):
    p = subprocess.run([sys.executable, "ddgan.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def test_cli_train_resume_equals_uninterrupted_then_sample(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    # a seed other than the default: --resume without --seed continues with the checkpoint's
    ddgan.main(["--train", "--preset", "tiny", "--max-steps", "8", "--out", full, "--n-samples", "2",
                "--seed", "3"])
    ddgan.main(["--train", "--preset", "tiny", "--max-steps", "4", "--out", part, "--n-samples", "2",
                "--seed", "3"])
    half = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert half["step"] == 4 and half["script"] == "ddgan"
    run("--train", "--preset", "tiny", "--max-steps", "8", "--out", part, "--resume", "--n-samples", "2")
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 8
    for k in ("G", "D", "ema"):
        assert states_equal(a[k], b[k]), k
        assert not states_equal(a[k], half[k])
    assert a["opt_g"]["state"][0]["step"] == b["opt_d"]["state"][0]["step"] == 8

    p = run("--sample", "--ckpt", os.path.join(full, "ckpt.pt"), "--out", str(tmp_path / "s"),
            "--n-samples", "4")
    assert "4 network evaluations" in p.stdout
    assert Image.open(tmp_path / "s" / "samples.png").size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    assert Image.open(tmp_path / "s" / "reverse.gif").n_frames == 5  # x_T and the 4 steps
    p = run("--sample", "--ckpt", os.path.join(full, "ckpt.pt"), "--timesteps", "2", check=False)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "T = 4" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_compile_trains_the_compiled_generator_and_saves_plain_names(tmp_path, compiled):
    plain, out = str(tmp_path / "plain"), str(tmp_path / "compiled")
    flags = ["--train", "--preset", "tiny", "--max-steps", "2", "--n-samples", "1"]
    ddgan.main([*flags, "--out", plain])
    assert compiled == []                                       # nothing compiled without --compile
    ddgan.main([*flags, "--out", out, "--compile"])
    assert [type(m) for m in compiled] == [ddgan.Generator]    # not D: R1's double backward
    a = torch.load(os.path.join(plain, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    for k in ("G", "D", "ema"):
        assert states_equal(a[k], b[k]), k


@pytest.mark.parametrize("flags,words",
                         [(["--timesteps", "0"], "--timesteps"), (["--lazy-reg", "0"], "--lazy-reg"),
                                         (["--r1-gamma", "-1"], "--r1-gamma"), (["--lr-d", "0"], "--lr-d"),
                                         (["--ds-lambda", "-1"], "--ds-lambda"),
                                         (["--ds-lambda", "1", "--batch-size", "1"], "needs pairs")])
def test_bad_flags_are_one_line_user_errors(flags, words):
    with pytest.raises(common.UserError, match=words):
        ddgan.main(["--train", "--preset", "tiny", *flags])


def test_z_drives_both_norms_of_every_residual_block_and_t_is_an_added_bias():
    torch.manual_seed(0)
    G = ddgan.Generator(TINY)
    blocks = [m for m in G.unet.modules() if isinstance(m, common.ResBlock)]
    assert blocks and all(isinstance(b.norm1, common.StyleNorm) and isinstance(b.norm2, common.StyleNorm)
                          for b in blocks)
    # t: one bias per channel, no scale
    assert all(b.emb.out_features == b.conv1.out_channels for b in blocks)
    # the mapping network: PixelNorm(z), nz -> z_dim, then n_mlp layers z_dim -> z_dim (official z_emb_dim)
    d = TINY["z_dim"]
    assert [(m.in_features, m.out_features) for m in G.mapping if isinstance(m, nn.Linear)] == \
        [(G.nz, d)] + [(d, d)] * TINY["n_mlp"]
    assert all(b.norm1.style.in_features == d == b.norm2.style.in_features for b in blocks)
    seen = {}

    def record(name):
        return lambda mod, inp, out: seen.setdefault(name, []).append(out.detach())
    blk = blocks[1]
    blk.norm1.style.register_forward_hook(record("norm1"))
    blk.norm2.style.register_forward_hook(record("norm2"))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        for p in G.parameters():                                      # zero-initialized layers would hide z
            p.add_(torch.randn_like(p) * 0.02)
        outs = [G(x, t, torch.randn(2, G.nz)) for _ in range(2)]
    for name in ("norm1", "norm2"):                                     # a new z, a new scale and shift ...
        a, b = seen[name]
        assert not torch.allclose(a, b)
        gamma = a[:, :a.shape[1] // 2]
        assert gamma.mean().item() == pytest.approx(1, abs=0.3)          # ... around gamma = 1 at the start
    assert not torch.allclose(outs[0], outs[1])                         # and another x_0'
    # with the same z, G still depends on t through the added time bias
    z = torch.randn(2, G.nz)
    with torch.no_grad():
        assert not torch.allclose(G(x, t, z), G(x, t + 1, z))


def test_diversity_term_is_dsgan_ratio_on_pairs_that_share_x_t_and_t():
    # known answer: pair 0 differs by 0.05 per pixel with |z1 - z2| = 1, pair 1 by 0.5 with 2: ratios 0.05
    # and 0.25, the second capped at tau = 0.1
    x0_pred = torch.zeros(4, 3, 8, 8)
    x0_pred[2], x0_pred[3] = 0.05, -0.5
    z = torch.zeros(4, 100)
    z[2], z[3] = 1.0, -2.0
    assert ddgan.diversity(x0_pred, z, tau=0.1).item() == pytest.approx((0.05 + 0.1) / 2)
    assert ddgan.diversity(torch.ones(4, 3, 8, 8), torch.randn(4, 100), tau=0.1) == 0   # ignores z: 0
    # in a training step, G's pairs (i, i + B/2) share x_{t+1} and t and differ in z; without the term, not
    torch.manual_seed(0)
    sched, x = ddgan.schedule_from(TINY, "cpu"), torch.rand(8, 3, 16, 16) * 2 - 1
    for lam in (1.0, 0.0):
        cfg = {**TINY, "ds_lambda": lam}
        G, D = ddgan.Generator(cfg), ddgan.Discriminator(cfg)
        calls = []
        G.register_forward_hook(lambda m, a, o: calls.append(a) if torch.is_grad_enabled() else None)
        ddgan.train_step(G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters()), sched, x,
                         cfg, 1)
        (x_t1, t, z), = calls
        assert torch.equal(x_t1[:4], x_t1[4:]) == torch.equal(t[:4], t[4:]) == (lam > 0)
        assert not torch.equal(z[:4], z[4:])


def test_diversity_term_makes_g_use_z():
    """Trained with the term, G's x_0' moves with z; trained without it for the same steps, G barely does."""
    sched, data = ddgan.schedule_from(TINY, "cpu"), common.load_data("shapes", 16, 3)
    moved = {}
    for lam in (0.0, 1.0):
        cfg = {**TINY, "ds_lambda": lam}
        torch.manual_seed(0)
        G, D = ddgan.Generator(cfg), ddgan.Discriminator(cfg)
        opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
        for step, (x, _, _) in zip(range(30), common.batches(data, 8, 0)):
            ddgan.train_step(G, D, opt_g, opt_d, sched, x, cfg, step)
        with torch.no_grad():
            t, x_t1 = torch.full((64,), 3), torch.randn(64, 3, 16, 16)
            moved[lam] = (G(x_t1, t, torch.randn(64, 100)) - G(x_t1, t, torch.randn(64, 100))).square().mean()
    assert moved[1.0] > 10 * moved[0.0]


def test_default_loss_has_the_term_and_a_batch_of_one_needs_it_off(tmp_path):
    # the cpu preset trains with DSGAN's term and tiny (the tests') with the same; the paper preset without
    cpu, paper = ddgan.PRESETS["cpu"], ddgan.PRESETS["paper"]
    assert cpu["ds_lambda"] == TINY["ds_lambda"] > 0 == paper.get("ds_lambda", 0)
    out = str(tmp_path / "b1")
    with pytest.raises(common.UserError, match=r"needs pairs: --batch-size 1 .*--ds-lambda 0"):
        ddgan.main(["--train", "--preset", "tiny", "--batch-size", "1", "--out", out])
    ddgan.main(["--train", "--preset", "tiny", "--batch-size", "1", "--ds-lambda", "0", "--max-steps", "1",
                "--out", out, "--n-samples", "1", "--threads", "1"])
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["config"]["ds_lambda"] == 0 and ck["config"]["batch_size"] == 1 and ck["step"] == 1


def test_ds_lambda_flag_trains_and_is_kept_in_the_checkpoint(tmp_path):
    out = str(tmp_path / "ds")
    ddgan.main(["--train", "--preset", "tiny", "--max-steps", "2", "--ds-lambda", "0.5", "--out", out,
                "--n-samples", "1", "--threads", "1"])
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["config"]["ds_lambda"] == 0.5 and ck["step"] == 2
