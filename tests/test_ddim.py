"""ddim.py: the generalized step (eq. 12) against the DDPM posterior, the samplers and inversion with
analytic noise predictors, timestep subsequences, slerp, and the command line on tiny models."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import ddim
import ddpm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sched():
    betas = torch.as_tensor(common.beta_schedule("linear", 1000))
    return betas, torch.cumprod(1 - betas, 0)


def gaussian_eps(abar, mu, s):
    """The exact E[eps | x_t] for data x_0 ~ N(mu, s^2), as ddim.py's eps_fn(x, t) with an int t."""
    def eps_fn(x, t):
        a = abar[t].item()
        return (1 - a) ** 0.5 * (x - a ** 0.5 * mu) / (a * s * s + 1 - a)
    return eps_fn


def point_mass_eps(abar, x0):
    """The exact noise predictor when all data is the one point x0."""
    return lambda x, t: (x - abar[t].item() ** 0.5 * x0) / (1 - abar[t].item()) ** 0.5


# --- subsequences -------------------------------------------------------------------------------------

@pytest.mark.parametrize("skip", ["uniform", "quad"])
def test_subsequences_are_sorted_unique_start_at_zero_and_have_s_steps(skip):
    for T in (10, 100, 1000):
        for S in sorted({1, 2, 3, 7, 10, 20, 33, 50, 100, T // 2 + 1, T - 1, T}):
            if S > T:
                continue
            ts = ddim.timestep_subsequence(T, S, skip)
            assert len(ts) == S and ts[0] == 0 and ts[-1] <= T - 1, (T, S, ts[:5], ts[-5:])
            assert all(b > a for a, b in zip(ts, ts[1:])) and all(isinstance(t, int) for t in ts)
        assert ddim.timestep_subsequence(T, T, skip) == list(range(T))
    for bad in (0, -1, 1001):
        with pytest.raises(common.UserError, match="--steps"):
            ddim.timestep_subsequence(1000, bad, skip)


def test_subsequences_match_the_official_choices_where_those_are_valid():
    for S in (10, 20, 50, 100, 250, 1000):  # range(0, T, T // S) when S divides T
        assert ddim.timestep_subsequence(1000, S, "uniform") == list(range(0, 1000, 1000 // S))
    assert ddim.timestep_subsequence(1000, 30, "uniform")[-1] == 966
    assert len(ddim.timestep_subsequence(1000, 30)) == 30
    for S in (5, 10, 20):  # int(linspace(0, sqrt(0.8 T), S)^2), strictly increasing at these S
        official = (np.linspace(0, np.sqrt(0.8 * 1000), S) ** 2).astype(int).tolist()
        assert ddim.timestep_subsequence(1000, S, "quad") == official
        assert official[-1] == 800
    with pytest.raises(common.UserError, match="--skip"):
        ddim.timestep_subsequence(1000, 10, "cubic")


# --- the step: eq. 12 with sigma(eta) of eq. 16 --------------------------------------------------------

@pytest.mark.parametrize("t", [1, 2, 10, 100, 500, 999])
def test_eta1_step_is_the_ddpm_posterior_mean_and_variance(sched, t):
    betas, abar = sched
    torch.manual_seed(t)
    x, eps = torch.randn(8, 3, 4, 4, dtype=torch.float64), torch.randn(8, 3, 4, 4, dtype=torch.float64)
    a, ap, b = abar[t].item(), abar[t - 1].item(), betas[t].item()
    sigma = ddim.ddim_sigma(a, ap, 1.0)
    mean, x0 = ddim.ddim_step(x, eps, a, ap, sigma, noise=torch.zeros_like(x))
    # q(x_{t-1} | x_t, x_0) of DDPM (Ho et al. eqs. 6-7), at x_0 = f_theta(x_t) (eq. 9), computed here
    # directly
    x0_direct = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    mu = b * math.sqrt(ap) / (1 - a) * x0_direct + (1 - ap) * math.sqrt(1 - b) / (1 - a) * x
    torch.testing.assert_close(x0, x0_direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, mu, rtol=1e-10, atol=1e-10)
    assert sigma ** 2 == pytest.approx(b * (1 - ap) / (1 - a), rel=1e-10)  # beta~_t
    # and ddpm.py's own p_mean_variance with the fixed small variance says the same
    d = ddpm.Diffusion(betas, var="small")
    tt = torch.full((8,), t)
    m2, logvar, _ = d.p_mean_variance(lambda xx, _t: eps.float(), x.float(), tt, clip=False)
    torch.testing.assert_close(m2.double(), mu, rtol=1e-4, atol=1e-5)
    assert logvar.exp()[0].item() == pytest.approx(sigma ** 2, rel=1e-5)
    # the noise really has standard deviation sigma
    z = torch.randn(200_000, dtype=torch.float64)
    draws, _ = ddim.ddim_step(torch.zeros_like(z), torch.zeros_like(z), a, ap, sigma)
    assert draws.std().item() == pytest.approx(sigma, rel=0.01)


def test_clipped_eta1_step_is_ddpm_clipped_posterior_and_eta0_has_no_noise(sched):
    betas, abar = sched
    torch.manual_seed(0)
    t, x, eps = 50, 3 * torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    a, ap = abar[t].item(), abar[t - 1].item()
    mean, x0 = ddim.ddim_step(x, eps, a, ap, ddim.ddim_sigma(a, ap, 1.0), clip=True,
                              noise=torch.zeros_like(x))
    assert x0.abs().max() <= 1 and (ddim.predict_x0(x, eps, a).abs() > 1).any()  # clipping did something
    d = ddpm.Diffusion(betas, var="small")
    m2, _, _ = d.p_mean_variance(lambda xx, _t: eps, x, torch.full((64,), t), clip=True)
    torch.testing.assert_close(mean, m2, rtol=1e-4, atol=1e-5)
    assert ddim.ddim_sigma(a, ap, 0.0) == 0
    y1, _ = ddim.ddim_step(x, eps, a, ap, 0.0)
    y2, _ = ddim.ddim_step(x, eps, a, ap, 0.0)
    assert torch.equal(y1, y2)
    # sigma(eta) grows with eta; sigma-hat is larger still (Sec. 5.1)
    s = [ddim.ddim_sigma(a, ap, e) for e in (0.0, 0.5, 1.0)]
    assert s[0] < s[1] < s[2] < ddim.sigma_hat(a, ap)
    assert ddim.sigma_hat(a, ap) ** 2 == pytest.approx(betas[t].item(), rel=1e-10)


def test_last_step_returns_x0_hat_exactly(sched):
    _, abar = sched
    torch.manual_seed(1)
    x, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    for t in (0, 7):
        for eta in (0.0, 0.5, 1.0):
            a = abar[t].item()
            sigma = ddim.ddim_sigma(a, 1.0, eta)
            assert sigma == 0
            out, x0 = ddim.ddim_step(x, eps, a, 1.0, sigma)
            assert torch.equal(out, x0)
    # in the samplers, with a predictor that is not exact: the final x is the final x0_hat
    wrong = lambda x, t: 0.3 * x + 0.1
    for kw in (dict(eta=0.0), dict(eta=1.0), dict(use_sigma_hat=True), dict(eta=0.5, skip="quad")):
        torch.manual_seed(2)
        out, traj = ddim.ddim_sample(wrong, torch.randn(3, 1, 4, 4), abar, 10, frames=10, **kw)
        assert len(traj) == 10 and torch.equal(traj[-1][0], traj[-1][1]) and torch.equal(out, traj[-1][1])


# --- samplers with analytic noise predictors ------------------------------------------------------------

def test_point_mass_eta0_lands_on_the_point_at_any_number_of_steps(sched):
    _, abar = sched
    torch.manual_seed(0)
    x0 = torch.rand(5, 3, 8, 8) * 2 - 1
    eps_fn = point_mass_eps(abar, x0)
    for S, skip in [(1, "uniform"), (10, "uniform"), (10, "quad"), (50, "quad"), (1000, "uniform")]:
        out, _ = ddim.ddim_sample(eps_fn, torch.randn_like(x0), abar, S, eta=0.0, skip=skip)
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    out, _ = ddim.ddim_sample(eps_fn, torch.randn_like(x0), abar, 20, eta=1.0)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    # a wrong point does not land there
    out, _ = ddim.ddim_sample(point_mass_eps(abar, -x0), torch.randn_like(x0), abar, 20)
    assert (out - x0).abs().mean() > 0.5


def test_eta1_every_step_is_ddpm_ancestral_sampling_and_sigma_hat_is_ddpm_large(sched):
    betas, abar = sched
    mu, s = 0.3, 0.5
    eps_fn = gaussian_eps(abar, mu, s)
    for var, kw in [("small", dict(eta=1.0)), ("large", dict(use_sigma_hat=True))]:
        d = ddpm.Diffusion(betas, var=var, device="cpu")  # float32, as the scripts sample
        torch.manual_seed(0)
        ref, _ = d.sample(lambda x, t: eps_fn(x, t[0].item()), (500, 1), "cpu", clip=var == "large")
        torch.manual_seed(0)
        out, _ = ddim.ddim_sample(eps_fn, torch.randn(500, 1), abar, 1000, **kw)
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)  # the same noise draws, the same chain


def test_gaussian_data_is_reproduced_and_eta0_suffers_least_from_few_steps(sched):
    _, abar = sched
    mu, s = -0.2, 0.4
    std = {}
    for eta in (0.0, 1.0):
        for S in (10, 50, 1000):
            torch.manual_seed(3)
            out, _ = ddim.ddim_sample(gaussian_eps(abar, mu, s), torch.randn(20_000, 1), abar, S, eta=eta)
            assert out.mean().item() == pytest.approx(mu, abs=0.02)
            std[eta, S] = out.std().item()
        assert std[eta, 1000] == pytest.approx(s, rel=0.02)
        assert std[eta, 10] < std[eta, 50] < std[eta, 1000]  # coarse steps shrink the spread (Euler error)
    assert std[1.0, 10] < std[0.0, 10] and std[1.0, 50] < std[0.0, 50] and std[0.0, 50] > 0.93 * s


def test_inversion_then_sampling_reconstructs_and_finds_the_exact_latent(sched):
    _, abar = sched
    mu, s = 0.1, 0.5
    eps_fn = gaussian_eps(abar, mu, s)
    torch.manual_seed(4)
    x0 = mu + s * torch.randn(2000, 1, dtype=torch.float64)
    errs = {}
    for S in (10, 50, 250, 1000):
        x_T = ddim.ddim_invert(eps_fn, x0, abar, S)
        rec, _ = ddim.ddim_sample(eps_fn, x_T, abar, S, eta=0.0)
        errs[S] = (rec - x0).square().mean().item()
        # the ODE's exact map for Gaussian data: x_t = sqrt(a) mu + sqrt(a s^2 + 1 - a) (x_0 - mu) / s;
        # inversion takes first-order (Euler) steps, so its latent is off by O(1/S)
        a = abar[ddim.timestep_subsequence(1000, S)[-1]].item()
        exact = a ** 0.5 * mu + (a * s * s + 1 - a) ** 0.5 * (x0 - mu) / s
        assert (x_T - exact).abs().max().item() < 12 / S
    assert errs[1000] < errs[250] < errs[50] < errs[10] and errs[50] < 5e-3 and errs[1000] < 1e-4, errs
    # on a point mass the round trip is exact whatever the steps
    p = torch.rand(3, 3, 4, 4) * 2 - 1
    rec, _ = ddim.ddim_sample(point_mass_eps(abar, p), ddim.ddim_invert(point_mass_eps(abar, p), p, abar, 7),
                              abar, 7)
    torch.testing.assert_close(rec, p, atol=1e-4, rtol=0)


# --- slerp, objectives, the loss ----------------------------------------------------------------------------

def test_slerp_endpoints_and_norm():
    torch.manual_seed(0)
    z0, z1 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(ddim.slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(ddim.slerp(z0, z1, 1.0), z1, atol=1e-5, rtol=1e-5)
    mid = ddim.slerp(z0, z1, 0.5).flatten(1).norm(dim=1)
    d = z0[0].numel()
    assert ((mid / d ** 0.5 - 1).abs() < 0.05).all()                            # stays on the shell
    assert ((((z0 + z1) / 2).flatten(1).norm(dim=1) / d ** 0.5 - 0.71).abs() < 0.05).all()  # lerp does not
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    third = torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]])  # 30 of the 90 degrees
    torch.testing.assert_close(ddim.slerp(e0, e1, 1 / 3), third)


def test_eps_model_converts_x0_and_v_networks(sched):
    _, abar = sched
    torch.manual_seed(0)
    x0, eps, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), 300
    a = abar[t].item()
    xt = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    outs = {"eps": eps, "x0": x0, "v": a ** 0.5 * eps - (1 - a) ** 0.5 * x0}
    for obj, out in outs.items():
        fn = ddim.eps_model(lambda x, tt: out, abar, obj)
        torch.testing.assert_close(fn(xt, t), eps, atol=1e-5, rtol=1e-5)
    with pytest.raises(common.UserError, match="objective"):
        ddim.eps_model(lambda x, tt: x, abar, "score")


def test_loss_simple_is_zero_for_the_exact_predictor(sched):
    _, abar = sched
    x0 = torch.full((32, 1, 2, 2), 0.5)
    def exact(xt, t):
        a = common.extract(abar, t, xt.shape)
        return (xt - a.sqrt() * x0) / (1 - a).sqrt()
    assert ddim.loss_simple(exact, x0, abar).item() < 1e-6
    assert ddim.loss_simple(lambda xt, t: torch.zeros_like(xt), x0, abar).item() > 0.5


# --- the command line ---------------------------------------------------------------------------------------

def run(*args, cwd, check=True):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "ddim.py"), *args], cwd=cwd, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert p.returncode == 0, f"{args}:\n{p.stdout}\n{p.stderr}"
    return p


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_train_sample_invert_interpolate_sweep_and_ddpm_checkpoints(tmp_path, monkeypatch, capsys):
    run("--train", "--preset", "tiny", "--max-steps", "6", "--out", "d", cwd=tmp_path)
    ck = torch.load(tmp_path / "d" / "ckpt.pt", weights_only=True)
    assert ck["script"] == "ddim" and ck["step"] == 6 and set(ddpm.PRESETS["tiny"]) <= set(ck["config"])
    assert Image.open(tmp_path / "d" / "samples.png").size == (6 * 18 + 2, 6 * 18 + 2)
    monkeypatch.chdir(tmp_path)  # the rest in this process: out/judge/ lands in tmp_path
    ddim.main(["--sample", "--ckpt", "d/ckpt.pt", "--out", "s1", "--n-samples", "4", "--steps", "10",
               "--eta", "0.5"])
    assert Image.open(tmp_path / "s1" / "samples.png").size == (2 * 18 + 2, 2 * 18 + 2)
    assert Image.open(tmp_path / "s1" / "x0_pred.gif").n_frames == 10

    # a ddpm.py checkpoint, as it is, with the command of the README
    ddpm.main(["--train", "--preset", "tiny", "--max-steps", "4", "--out", "p", "--n-samples", "1"])
    p = run("--sample", "--ckpt", "p/ckpt.pt", "--steps", "50", "--eta", "0", "--out", "s2",
            "--n-samples", "4",
            cwd=tmp_path)
    assert "ddpm.py checkpoint" in p.stdout and Image.open(tmp_path / "s2" / "reverse.gif").n_frames > 10
    ddim.main(["--sample", "--sigma-hat", "--skip", "quad", "--steps", "100", "--ckpt", "p/ckpt.pt",
               "--out", "s3",
               "--n-samples", "2"])
    assert os.path.exists(tmp_path / "s3" / "samples.png")

    capsys.readouterr()
    ddim.main(["--sample", "--invert", "--ckpt", "p/ckpt.pt", "--out", "inv", "--n-samples", "4",
               "--steps", "20"])
    res = last_json(capsys)
    assert res["mode"] == "invert" and res["n"] == 4 and 0 <= res["mse"] < 0.05 and res["psnr"] > 13
    assert Image.open(tmp_path / "inv" / "invert.png").size == (8 * 18 + 2, 18 + 2)  # 4 pairs in one row
    ddim.main(["--sample", "--interpolate", "--ckpt", "d/ckpt.pt", "--out", "itp", "--n-samples", "2",
               "--steps", "5"])
    assert Image.open(tmp_path / "itp" / "interpolate.png").size == (11 * 18 + 2, 2 * 18 + 2)
    assert Image.open(tmp_path / "itp" / "interpolate.gif").n_frames == 20

    capsys.readouterr()
    ddim.main(["--eval", "--sweep", "--preset", "tiny", "--out", "d", "--n-samples", "4",
               "--batch-size", "4"])
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    # S in {10, 20, 50, 100} (T = 100) x 4 samplers
    assert res["mode"] == "sweep" and len(res["rows"]) == 4 * 4
    cells = {(r["sampler"], r["steps"]) for r in res["rows"]}
    assert cells == {(n, S) for n in ("eta=0", "eta=0.5", "eta=1", "sigma-hat") for S in (10, 20, 50, 100)}
    assert all(r["fid"] > 0 and r["sec_per_image"] > 0 and r["nfe"] == r["steps"] for r in res["rows"])
    eta0 = {r["steps"]: r["rms_to_max_steps"] for r in res["rows"] if r["sampler"] == "eta=0"}
    assert eta0[100] == 0 and eta0[10] > 0
    assert "| FID | S=10 | S=20 | S=50 | S=100 |" in out and "| sigma-hat |" in out
    assert (tmp_path / "d" / "sweep_eta0_S10" / "eval_samples.png").exists()


@pytest.mark.parametrize("args,msg", [
    (["--sample", "--steps", "101"], "--steps 101"),
    (["--sample", "--steps", "0"], "--steps 0"),
    (["--sample", "--eta", "1.5"], "--eta 1.5"),
    (["--sample", "--eta", "-0.1"], "--eta -0.1"),
    (["--sample", "--sigma-hat", "--eta", "1"], "--sigma-hat"),
    (["--sample", "--sweep"], "--sweep goes with --eval"),
    (["--eval", "--sweep", "--steps", "10"], "give --sweep or --steps, not both"),
    (["--eval", "--invert"], "--invert goes with --sample"),
    (["--sample", "--invert", "--interpolate"], "not both"),
    (["--sample", "--ckpt", "missing.pt"], "not found"),
])
def test_bad_input_is_a_user_error(tmp_path, monkeypatch, args, msg):
    monkeypatch.chdir(tmp_path)
    # a tiny ddpm.py checkpoint (T = 100) where ddim.py looks by default
    common.save_checkpoint({"script": "ddpm", "config": ddpm.PRESETS["tiny"], "step": 0,
                            "ema": common.build_unet(ddpm.PRESETS["tiny"]).state_dict()}, "out/ddim/ckpt.pt")
    with pytest.raises(common.UserError, match=re.escape(msg)):
        ddim.main(args)


def test_cli_bad_input_is_one_line_on_stderr(tmp_path):
    p = run("--sample", "--eta", "2", cwd=tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: --eta 2")
    assert len(p.stderr.strip().splitlines()) == 1
