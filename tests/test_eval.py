"""Evaluation (common.py): FID/KID against closed forms, captions, attribute accuracy, the judge,
the Inception FID network's layout, ddpm.py's respacing, and `ddpm.py --eval` from the CLI."""
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
import ddpm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
f64 = dict(dtype=torch.float64)


def random_spd(d, g, eps=0.2):
    a = torch.randn(d, d, generator=g, **f64)
    return a @ a.T / d + eps * torch.eye(d, **f64)


def gaussian(mu, cov, n, g):
    return mu + torch.randn(n, len(mu), generator=g, **f64) @ torch.linalg.cholesky(cov).T


# --- FID ------------------------------------------------------------------------------------------

def test_frechet_distance_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=g, **f64), torch.randn(6, generator=g, **f64)
    a, b = torch.rand(6, generator=g, **f64) + 0.1, torch.rand(6, generator=g, **f64) + 0.1
    exact = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()  # commuting covariances
    fd = common.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert fd == pytest.approx(exact.item(), rel=1e-9)


def test_frechet_distance_non_commuting_2x2_closed_form():
    # for a 2x2 matrix M with positive eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        s1, s2 = random_spd(2, g), random_spd(2, g)
        assert not torch.allclose(s1 @ s2, s2 @ s1)
        mu1, mu2 = torch.randn(2, generator=g, **f64), torch.randn(2, generator=g, **f64)
        tr_sqrt = (torch.trace(s1 @ s2) + 2 * (torch.det(s1) * torch.det(s2)).sqrt()).sqrt()
        exact = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt
        assert common.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact.item(), rel=1e-9, abs=1e-12)


def test_frechet_distance_matches_general_eigenvalues_and_is_rotation_invariant():
    g = torch.Generator().manual_seed(2)
    d = 8
    s1, s2 = random_spd(d, g), random_spd(d, g)
    mu1, mu2 = torch.randn(d, generator=g, **f64), torch.randn(d, generator=g, **f64)
    # tr sqrt(s1 s2) from the (real, positive) eigenvalues of the non-symmetric product
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).real.sqrt().sum()
    exact = ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()
    fd = common.frechet_distance(mu1, s1, mu2, s2)
    assert fd == pytest.approx(exact, rel=1e-8)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, **f64))
    rotated = common.frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert rotated == pytest.approx(fd, rel=1e-8)
    assert abs(common.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_fid_of_gaussian_samples_matches_closed_form_and_identical_sets_give_zero():
    g = torch.Generator().manual_seed(3)
    mu1 = torch.tensor([0.0, 1.0, -1.0, 0.5], **f64)
    mu2 = mu1 + torch.tensor([0.5, -0.5, 0.0, 1.0], **f64)
    s1, s2 = random_spd(4, g), random_spd(4, g)
    exact = common.frechet_distance(mu1, s1, mu2, s2)
    f1, f2 = gaussian(mu1, s1, 40_000, g), gaussian(mu2, s2, 40_000, g)
    est = common.frechet_distance(*common.feature_stats(f1), *common.feature_stats(f2))
    assert est == pytest.approx(exact, rel=0.05)
    assert abs(common.frechet_distance(*common.feature_stats(f1), *common.feature_stats(f1))) < 1e-8
    mu, cov = common.feature_stats(f1)
    assert torch.allclose(cov, torch.cov(f1.T))  # unbiased, like numpy.cov


# --- KID ------------------------------------------------------------------------------------------

def cubic_kernel_mean(a, b, d):
    """E k(x, y) for k(x, y) = (x.y / d + 1)^3 and independent x ~ N(mu_a, S_a), y ~ N(mu_b, S_b), from
    the Gaussian moments E[x x^T] = S + mu mu^T and E[x_i x_j x_k] = mu_i mu_j mu_k + mu_i S_jk + ..."""
    def moments(mu, s):
        third = (torch.einsum("i,j,k->ijk", mu, mu, mu) + torch.einsum("i,jk->ijk", mu, s)
                 + torch.einsum("j,ik->ijk", mu, s) + torch.einsum("k,ij->ijk", mu, s))
        return mu, s + torch.outer(mu, mu), third
    (ma, sa, ta), (mb, sb, tb) = moments(*a), moments(*b)
    eu, eu2, eu3 = ma @ mb / d, (sa * sb).sum() / d ** 2, (ta * tb).sum() / d ** 3
    return (eu3 + 3 * eu2 + 3 * eu + 1).item()


def test_kid_matches_closed_form_mmd_of_two_gaussians():
    g = torch.Generator().manual_seed(4)
    d = 3
    a = (torch.tensor([0.0, 0.5, -0.3], **f64), random_spd(d, g))
    b = (a[0] + torch.tensor([0.4, -0.2, 0.3], **f64), random_spd(d, g))
    exact = cubic_kernel_mean(a, a, d) + cubic_kernel_mean(b, b, d) - 2 * cubic_kernel_mean(a, b, d)
    est = common.kid(gaussian(*a, 8000, g), gaussian(*b, 8000, g), subsets=20, subset_size=1000)
    assert exact > 1 and est == pytest.approx(exact, rel=0.1)


def test_kid_is_the_unbiased_mmd_estimate_written_out():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(5, 3, generator=g, **f64), torch.randn(5, 3, generator=g, **f64) + 0.5
    k = lambda a, b: (a @ b / 3 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(5)) / 25
    assert common.kid(x, y) == pytest.approx((xx + yy - 2 * xy).item(), rel=1e-12)


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    g = torch.Generator().manual_seed(5)
    mu, s = torch.zeros(16, **f64), random_spd(16, g)
    x, y = gaussian(mu, s, 1000, g), gaussian(mu, s, 1000, g)
    same, ident = common.kid(x, y), common.kid(x, x)
    shifted = common.kid(x, gaussian(mu + 0.3, s, 1000, g))
    assert abs(same) < 0.01 and shifted > 0.05 and shifted > 20 * abs(same)
    # x against itself: the unbiased estimate is -2 (mean k(x_i, x_i) - mean k(x_i, x_j)) / m, small
    assert abs(ident) < 0.1 * shifted


# --- Captions and attribute accuracy ---------------------------------------------------------------

def test_parse_caption_inverts_shape_caption_for_every_combination():
    combos = list(itertools.product(common.SHAPES, common.COLORS, common.SIZES, common.POSITIONS))
    assert len(combos) == 4 * 6 * 2 * 3
    for shape, color, size, pos in combos:
        a = {"shape": shape, "color": color, "size": size, "position": pos}
        assert common.parse_caption(common.shape_caption(a)) == a


def test_parse_caption_partial_and_conflicting():
    assert common.parse_caption("a red circle") == {"color": "red", "shape": "circle"}
    assert common.parse_caption("Something on the LEFT.") == {"position": "left"}
    assert common.parse_caption("two large crosses") == {"size": "large", "shape": "cross"}
    assert common.parse_caption("a photo of a dog") == {}
    with pytest.raises(common.UserError, match="two colors"):
        common.parse_caption("a red and blue square")


class StubJudge(nn.Module):
    """Predicts head k's class from pixel (0, k) of channel 0: the answers are known."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return {k: nn.functional.one_hot(x[:, 0, 0, i].round().long(), len(v)).float()
                for i, (k, v) in enumerate(self.classes.items())}


def images_with(classes, answers):
    x = torch.zeros(len(answers), 3, 4, 4)
    for n, a in enumerate(answers):
        for i, k in enumerate(classes):
            x[n, 0, 0, i] = classes[k].index(a[k])
    return x


def test_attribute_accuracy_with_known_answers():
    judge = StubJudge(common.SHAPE_HEADS)
    truth = [dict(shape="circle", color="red", size="small", position="left"),
             dict(shape="square", color="blue", size="large", position="center"),
             dict(shape="cross", color="white", size="small", position="right"),
             dict(shape="triangle", color="green", size="large", position="left")]
    x = images_with(common.SHAPE_HEADS, truth)
    assert common.attribute_accuracy(judge, x, truth) == 1.0
    assert common.attribute_accuracy(judge, x, [common.shape_caption(a) for a in truth]) == 1.0
    assert common.attribute_accuracy(judge, x, [0, 1, 3, 2]) == 1.0  # shapes labels = shape index
    assert common.attribute_accuracy(judge, x, [0, 1, 2, 2]) == 0.75
    # every named attribute must match; unnamed ones do not count
    wanted = ["a red circle", "a large blue square on the left", "a small white cross", "a purple triangle"]
    assert common.attribute_accuracy(judge, x, wanted) == 0.5
    wanted = [{**truth[0], "jitter": (0, 0, 1)}, {"size": "small"}, {}, {"position": "left"}]
    assert common.attribute_accuracy(judge, x, wanted) == 0.75
    labels = StubJudge({"label": ["cat", "dog", "frog"]})
    x = images_with(labels.classes, [{"label": c} for c in ["dog", "dog", "frog", "cat"]])
    assert common.attribute_accuracy(labels, x, [1, 1, 2, 2]) == 0.75
    assert common.attribute_accuracy(labels, x, ["dog", "cat", "frog", "cat"]) == 0.75
    with pytest.raises(common.UserError, match="cannot judge"):
        common.attribute_accuracy(labels, x, ["horse"] * 4)


# --- The judge -------------------------------------------------------------------------------------

def test_judge_shapes_and_deterministic_training():
    judge = common.Judge(common.SHAPE_HEADS)
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    out = judge(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"shape": (5, 4), "color": (5, 6), "size": (5, 2),
                                                             "position": (5, 3)}
    assert judge.features(x).shape == (5, 128)
    a = common.train_judge("shapes", 16, 3, torch.device("cpu"), steps=3)
    b = common.train_judge("shapes", 16, 3, torch.device("cpu"), steps=3)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert set(a["accuracy"]) == {"shape", "color", "size", "position", "all"} and a["n_test"] == 1000
    judge = common.Judge(a["heads"])
    judge.load_state_dict(a["model"])
    held = common.load_data("shapes", 16, 3, train=False)
    f = common.features(judge, torch.stack([held[i][0] for i in range(1000)]))  # the judge's test set
    assert f.shape == (1000, 128) and f.square().mean().item() == pytest.approx(1.0, rel=1e-4)


def test_get_judge_caches_and_labelled_folder(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for cls, color in (("blue", "blue"), ("red", "red")):
        (root / cls).mkdir(parents=True)
        for i in range(20):
            a = dict(shape=common.SHAPES[i % 4], color=color, size=common.SIZES[i % 2],
                     position=common.POSITIONS[i % 3])
            common.draw_shape(a, 16).save(root / cls / f"{i}.png")
    cache = str(tmp_path / "judge")
    judge = common.get_judge(str(root), 16, 3, torch.device("cpu"), steps=40, cache_dir=cache)
    assert judge.classes == {"label": ["blue", "red"]} and judge.accuracy["label"] == 1.0  # 4 held-out images
    path = common.judge_path(str(root), 16, 3, steps=40, cache_dir=cache)
    assert os.path.exists(path) and os.path.basename(path).startswith("judge_data-")
    monkeypatch.setattr(common, "train_judge", lambda *a, **k: pytest.fail("retrained a cached judge"))
    again = common.get_judge(str(root), 16, 3, torch.device("cpu"), steps=40, cache_dir=cache)
    assert all(torch.equal(p, q) for p, q in zip(judge.parameters(), again.parameters()))


def test_evaluate_scores_faithful_and_stubborn_conditional_samplers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the judge is cached in ./out/judge
    args = common.make_parser("x", "", ddpm.PRESETS).parse_args(["--eval", "--n-samples", "60", "--out", "e"])
    cfg = {"image_size": 16, "channels": 3, "judge_steps": 150}

    def faithful(k, captions):  # draws exactly what each caption asks for
        return torch.stack([common.to_tensor(common.draw_shape(common.parse_caption(c), 16))
                            for c in captions])

    def stubborn(k, captions):  # ignores the captions
        a = dict(shape="circle", color="red", size="small", position="left")
        return common.to_tensor(common.draw_shape(a, 16))[None].repeat(k, 1, 1, 1)

    good = common.evaluate("x", args, cfg, faithful, nfe=1, device=torch.device("cpu"), cond="caption")
    bad = common.evaluate("x", args, cfg, stubborn, nfe=1, device=torch.device("cpu"), cond="caption")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == bad
    assert good["acc"] > 0.85 and bad["acc"] < 0.1
    assert bad["fid"] > 5 * good["fid"] and bad["kid"] > good["kid"]
    assert good["n_samples"] == 60 and good["nfe"] == 1 and good["fid_floor"] > 0
    assert Image.open(tmp_path / "e" / "eval_samples.png").size == (8 * 18 + 2, 8 * 18 + 2)


# --- The standard FID Inception network --------------------------------------------------------------

def test_inception_pools_average_only_real_pixels_and_mixed_7c_max_pools():
    net = common.InceptionFID().eval()
    pools = [net.Mixed_7b.pool, net.Mixed_7c.pool, net.Mixed_6a.pool, net.Mixed_7a.pool]
    assert pools == ["avg", "max", "down", "down"]
    with torch.no_grad():
        for block, cin, pool_ch in ((net.Mixed_5b, 192, 32), (net.Mixed_6b, 768, 192),
                                    (net.Mixed_7b, 1280, 192)):
            out = block(torch.ones(1, cin, 5, 5))[:, -pool_ch:]  # the pool branch, from a constant image
            # no zero padding
            assert out.abs().sum() > 0 and torch.allclose(out, out[:, :, :1, :1].expand_as(out))


def test_inception_fid_layout_loads_random_weights_and_gives_2048_features(tmp_path):
    net = common.InceptionFID()
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and with
    # 1008 classes (+8 x 2049) that is the FID network's 23,850,960
    assert common.count_params(net) == 23_850_960
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len([k for k in sd if k.endswith("conv.weight")]) == 94 and len(sd) == 94 * 5 + 2
    expect = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
              "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
              "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
              "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
              "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
              "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
              "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
              "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "fc.weight": (1008, 2048)}
    assert {k: tuple(sd[k].shape) for k in expect} == expect
    g = torch.Generator().manual_seed(0)
    rand = {k: torch.rand(v.shape, generator=g) + 0.5 if "running_var" in k  # variances must be positive
            else torch.randn(v.shape, generator=g) * 0.05 for k, v in sd.items()}
    path = str(tmp_path / "pt_inception.pth")
    torch.save(rand, path)
    loaded = common.InceptionFID.load(path)
    assert torch.equal(loaded.Mixed_6c.branch7x7_2.conv.weight, rand["Mixed_6c.branch7x7_2.conv.weight"])
    f = common.features(loaded, torch.rand(2, 3, 32, 32) * 2 - 1)
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and f.std() > 0
    assert common.features(loaded, torch.rand(1, 1, 28, 28)).shape == (1, 2048)  # grayscale, any size

    with pytest.raises(common.UserError, match="no such file"):
        common.InceptionFID.load(str(tmp_path / "missing.pth"))
    torch.save({k: v for k, v in rand.items() if k != "Mixed_5b.branch1x1.bn.bias"}, path)
    with pytest.raises(common.UserError, match="1 missing"):
        common.InceptionFID.load(path)
    torch.save({**rand, "fc.weight": torch.zeros(1000, 2048)}, path)
    with pytest.raises(common.UserError, match="1 wrongly shaped"):
        common.InceptionFID.load(path)


# --- ddpm.py: respacing and the CLI ----------------------------------------------------------------

def test_respace_keeps_marginals_and_full_length_is_identity():
    diff = ddpm.Diffusion(common.beta_schedule("linear", 1000))
    same = ddpm.respace(diff, 1000)
    assert same is diff and torch.equal(same.timestep_map, torch.arange(1000))
    short = ddpm.respace(diff, 50)
    ts = short.timestep_map
    assert ts[0] == 0 and ts[-1] == 999 and len(ts.unique()) == 50 and short.T == 50
    assert torch.allclose(short.abar, diff.abar[ts], rtol=1e-10)
    one = ddpm.respace(diff, 1)
    assert one.timestep_map.tolist() == [999] and torch.allclose(one.abar, diff.abar[-1:])
    with pytest.raises(common.UserError, match="--steps 1001: use 1..1000"):
        ddpm.respace(diff, 1001)
    # the respaced sampler calls the network at the original timesteps
    seen = []
    short.sample(lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x), (1, 1), "cpu")
    assert seen == ts.flip(0).tolist()


def run(*args, cwd):
    # one thread: tiny networks gain nothing from more, and busy CPUs make OpenMP threads spin
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_eval_prints_json_last_and_caches_the_judge(tmp_path, monkeypatch, capsys):
    script = os.path.join(ROOT, "ddpm.py")
    monkeypatch.chdir(tmp_path)                                     # out/judge/ goes under tmp_path
    ddpm.main(["--train", "--preset", "tiny", "--max-steps", "4", "--out", "run", "--n-samples", "1"])
    p = run(script, "--eval", "--preset", "tiny", "--out", "run", "--n-samples", "12", "--batch-size", "5",
            "--steps", "10", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "training the judge" in p.stdout
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"fid", "kid", "nfe", "sec_per_image", "fid_floor", "steps", "judge_acc"} <= res.keys()
    assert res["nfe"] == res["steps"] == 10 and res["n_samples"] == 12 and "acc" not in res
    assert res["fid"] > 0 and res["sec_per_image"] > 0
    assert os.path.exists(tmp_path / "out" / "judge" / "judge_shapes_16_3_s30.pt")
    assert Image.open(tmp_path / "run" / "eval_samples.png").size == (4 * 18 + 2, 3 * 18 + 2)

    capsys.readouterr()
    res2 = ddpm.main(["--eval", "--preset", "tiny", "--out", "run", "--n-samples", "12", "--batch-size", "5",
                      "--steps", "10"])
    assert "training the judge" not in capsys.readouterr().out
    assert res2["fid"] == res["fid"]                                   # same seed, same samples

    p = run(script, "--eval", "--preset", "tiny", "--out", "run", "--steps", "101", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --steps 101"), p.stderr
    with pytest.raises(common.UserError, match="^--fid-weights nope.pth: no such file"):
        ddpm.main(["--eval", "--preset", "tiny", "--out", "run", "--fid-weights", "nope.pth"])
    with pytest.raises(common.UserError, match="^--n-samples 1"):
        ddpm.main(["--eval", "--preset", "tiny", "--out", "run", "--n-samples", "1"])


def test_precision_recall_on_clear_cases():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g, dtype=torch.float64)
    assert common.precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    assert common.precision_recall(real, real + 100) == {"precision": 0.0, "recall": 0.0}
    # high fidelity, no diversity
    collapsed = real[:1] + 0.01 * torch.randn(300, 8, generator=g, dtype=torch.float64)
    pr = common.precision_recall(real, collapsed)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.05


def test_judge_confidence_counts_images_the_judge_is_sure_of_on_every_head():
    judge = common.Judge({"a": ["x", "y"], "b": ["u", "v", "w"]}, channels=1).eval()
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    for head in judge.heads.values():
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    assert common.judge_confident(judge, x) == 0.0                      # uniform: 1/2 and 1/3 are not > 0.9
    with torch.no_grad():
        judge.heads["a"].bias.copy_(torch.tensor([10.0, 0.0]))
        assert common.judge_confident(judge, x) == 0.0                  # sure on one head only
        judge.heads["b"].bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
        assert common.judge_confident(judge, x) == 1.0
        judge.heads["b"].bias.copy_(torch.tensor([0.0, 2.0, 2.0]))      # p = 0.47: not sure
        assert common.judge_confident(judge, x) == 0.0
