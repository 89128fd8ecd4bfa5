"""The DDPM math of ddpm.py against closed forms and direct computations."""
import math

import numpy as np
import pytest
import torch

import common
import ddpm


@pytest.fixture(scope="module")
def diff():
    return ddpm.Diffusion(common.beta_schedule("linear", 1000), var="small")


def test_linear_schedule_endpoints_and_monotone():
    b = common.beta_schedule("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert np.all(np.diff(b) > 0)


def test_cosine_schedule_matches_alpha_bar_formula():
    T = 1000
    b = common.beta_schedule("cosine", T)
    assert np.all(b > 0) and np.all(b <= 0.999) and np.all(np.diff(b) >= 0)
    abar = np.cumprod(1 - b)
    f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
    t = np.arange(1, T + 1)
    unclipped = b < 0.999
    np.testing.assert_allclose(abar[unclipped], (f(t) / f(0))[unclipped], rtol=1e-9)
    assert b[-1] == 0.999  # the last beta is clipped


def test_sigmoid_schedule_endpoints_and_monotone():
    b = common.beta_schedule("sigmoid", 500)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert np.all(np.diff(b) > 0)


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(common.UserError, match="unknown beta schedule"):
        common.beta_schedule("nope", 10)


def test_closed_form_q_matches_iterating_one_step_kernels(diff):
    # iterate q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t): mean m and variance v of x_t given x_0
    x0 = 0.7
    m, v = x0, 0.0
    for t in range(diff.T):
        m = math.sqrt(diff.alphas[t]) * m
        v = diff.alphas[t].item() * v + diff.betas[t].item()
        if t in (0, 1, 10, 500, 999):
            assert m == pytest.approx(math.sqrt(diff.abar[t]) * x0, rel=1e-9)
            assert v == pytest.approx(1 - diff.abar[t].item(), rel=1e-9)


def test_q_sample_empirical_moments(diff):
    torch.manual_seed(0)
    n, t = 200_000, torch.full((200_000,), 300)
    x0 = torch.full((n, 1), -0.4)
    xt = diff.q_sample(x0, t, torch.randn_like(x0))
    a = diff.abar[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(a) * -0.4, abs=0.01)
    assert xt.var().item() == pytest.approx(1 - a, rel=0.02)


@pytest.mark.parametrize("t", [1, 5, 100, 999])
def test_posterior_matches_bayes_rule(diff, t):
    # prior x_{t-1} | x_0 ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1});
    # likelihood x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t)
    x0 = torch.tensor([[0.3], [-0.9]], dtype=torch.float64)
    xt = torch.tensor([[1.2], [0.1]], dtype=torch.float64)
    ap, al, be = diff.abar[t - 1].item(), diff.alphas[t].item(), diff.betas[t].item()
    prec = 1 / (1 - ap) + al / be
    var = 1 / prec
    mean = var * (math.sqrt(ap) * x0 / (1 - ap) + math.sqrt(al) * xt / be)
    m, logvar = diff.q_posterior(x0, xt, torch.tensor([t, t]))
    torch.testing.assert_close(m, mean, rtol=1e-12, atol=1e-12)  # the float64 schedule: exact
    assert logvar.exp()[0].item() == pytest.approx(var, rel=1e-5)


def test_posterior_variance_at_zero_is_clipped_not_minus_inf(diff):
    assert diff.post_var[0] == 0
    assert torch.isfinite(diff.post_logvar).all() and diff.post_logvar[0] == diff.post_logvar[1]
    assert diff.large_logvar[0] == diff.post_logvar[1]
    torch.testing.assert_close(diff.large_logvar[1:], diff.betas[1:].log())


def test_eps_x0_v_conversions_round_trip(diff):
    torch.manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 400, 800, 999])
    xt = diff.q_sample(x0, t, eps)
    torch.testing.assert_close(diff.x0_from_eps(xt, t, eps), x0, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(diff.eps_from_x0(xt, t, x0), eps, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(diff.x0_from_v(xt, t, diff.v_target(x0, t, eps)), x0, atol=1e-5, rtol=1e-5)
    for obj, out in [("eps", eps), ("x0", x0), ("v", diff.v_target(x0, t, eps))]:
        d = ddpm.Diffusion(diff.betas, objective=obj)
        torch.testing.assert_close(d.predict_x0(out, xt, t), x0, atol=2e-3, rtol=1e-4)


def test_posterior_mean_form_equals_algorithm_2_when_unclipped(diff):
    torch.manual_seed(1)
    xt, eps = torch.randn(4, 2), torch.randn(4, 2)
    t = torch.tensor([1, 50, 500, 999])
    mean, _, _ = diff.p_mean_variance(lambda x, tt: eps, xt, t, clip=False)
    a, ab, b = (common.extract(v, t, xt.shape) for v in (diff.alphas, diff.abar, diff.betas))
    alg2 = (xt - b / (1 - ab).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(mean, alg2, atol=1e-4, rtol=1e-4)


def gaussian_eps(diff, mu, s):
    """The exact E[eps | x_t] for data x_0 ~ N(mu, s^2): the optimal noise predictor."""
    def model(xt, t):
        a = common.extract(diff.abar, t, xt.shape)
        return (1 - a).sqrt() * (xt - a.sqrt() * mu) / (a * s * s + 1 - a)
    return model


@pytest.mark.parametrize("var", ["small", "large"])
def test_ancestral_sampler_with_analytic_predictor_reproduces_gaussian_data(var):
    torch.manual_seed(0)
    mu, s = 0.3, 0.5
    d = ddpm.Diffusion(common.beta_schedule("linear", 1000), var=var)
    x, traj = d.sample(gaussian_eps(d, mu, s), (10_000, 1), "cpu", clip=False, frames=5)
    assert x.mean().item() == pytest.approx(mu, abs=0.03)
    assert x.std().item() == pytest.approx(s, rel=0.06)
    assert len(traj) == 5 and traj[-1].shape == x.shape
    # and a wrong predictor (for data N(-mu, s^2)) does not
    y, _ = d.sample(gaussian_eps(d, -mu, s), (10_000, 1), "cpu", clip=False)
    assert y.mean().item() == pytest.approx(-mu, abs=0.03)


def test_loss_is_zero_for_the_true_noise_and_positive_otherwise():
    # a "model" that recovers eps exactly from x_t because x_0 is known (a point mass at x0)
    d = ddpm.Diffusion(common.beta_schedule("linear", 100))
    x0 = torch.full((64, 1, 2, 2), 0.5)
    exact = lambda xt, t: d.eps_from_x0(xt, t, x0)
    assert d.loss(exact, x0).item() < 1e-6
    assert d.loss(lambda xt, t: torch.zeros_like(xt), x0).item() > 0.5
    for obj in ("x0", "v"):
        dd = ddpm.Diffusion(d.betas, objective=obj)

        def pred(xt, t):
            return x0 if obj == "x0" else dd.v_target(x0, t, dd.eps_from_x0(xt, t, x0))
        assert dd.loss(pred, x0).item() < 1e-6


def test_paper_preset_is_the_papers_35_7m_cifar10_model():
    cfg = ddpm.PRESETS["paper"]
    assert (cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"], cfg["attn_res"], cfg["dropout"]) == \
        (128, [1, 2, 2, 2], 2, [16], 0.1)
    assert common.count_params(common.build_unet(cfg)) == pytest.approx(35.7e6, abs=0.1e6)
