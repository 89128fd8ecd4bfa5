"""Apple silicon (MPS) holds no float64, and `--device auto` picks it on a Mac. No training step, sampler
step or evaluation feature of any script may therefore put a float64 tensor on the network's device. Without a
Mac the rule is checked here more strictly: while a step runs on the CPU, no float64 tensor is created at all
(TorchDispatchMode sees every op, the backward pass included). The schedules are computed in float64 before,
as the scripts do, and reach the step as float32 copies (common.on_device) or as Python floats."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import common
import ddgan
import ddim
import ddpm
import dreambooth
import guided
import ldm

CPU = torch.device("cpu")


class Float64Watch(TorchDispatchMode):
    """Records every op that returns a float64 tensor, and every op seen."""

    def __init__(self):
        super().__init__()
        self.float64, self.ops = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops.add(name)
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_leaves(out)):
            self.float64.append(name)
        return out


def no_float64(step):
    """Run step() under the watch; fail naming the ops that made float64 tensors. Returns the ops seen."""
    with Float64Watch() as w:
        step()
    assert not w.float64, f"float64 tensors created by {sorted(set(w.float64))}"
    return w.ops


def sgd_step(model, loss):
    opt = common.make_optimizer(model.parameters(), 1e-3, device=CPU)
    return lambda: (loss().backward(), opt.step())


def shapes_batch(cfg, n=2):
    data = common.ShapesData(cfg["image_size"], cfg["channels"])
    items = [data[i] for i in range(n)]
    images, labels = torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items])
    return images, labels, [it[2] for it in items]


def test_the_watch_sees_float64_and_the_backward_pass():
    lin = torch.nn.Linear(3, 1)
    ops = no_float64(sgd_step(lin, lambda: lin(torch.randn(2, 3)).sum()))
    with pytest.raises(AssertionError, match="float64"):
        no_float64(lambda: torch.ones(2) * torch.ones(2, dtype=torch.float64))
    # the bug this file guards against: a float64 schedule gathered at the batch's timesteps
    # device None: float64, for the math tests
    old = ddpm.Diffusion(common.beta_schedule("linear", 10))
    with pytest.raises(AssertionError, match="float64"):
        no_float64(lambda: old.q_sample(torch.zeros(2, 1), torch.tensor([1, 2]), torch.zeros(2, 1)))
    assert {"addmm", "mm"} <= ops                                         # forward and backward


def test_ddpm_and_ddim_training_and_sampler_steps():
    cfg = dict(ddpm.PRESETS["tiny"])
    args = common.make_parser("ddpm", "", ddpm.PRESETS, gifs=True).parse_args(["--train", "--steps", "4"])
    args.no_clip = False
    x, y, caps = shapes_batch(cfg)
    for objective in (ddpm.objective(args), ddim.objective):
        model = common.build_unet(cfg)
        loss_fn, sample_fn = objective(cfg, CPU)
        ops = no_float64(sgd_step(model, lambda: loss_fn(model, x, y, caps)))
        assert "convolution_backward" in ops
        no_float64(lambda: sample_fn(model.eval(), 2))                # ddpm: 4 respaced steps; ddim: 50 steps
    diff = ddpm.diffusion_from(cfg, CPU)
    no_float64(lambda: diff.p_sample(model, torch.randn(2, 3, 16, 16), torch.tensor([5, 0])))


def test_guided_training_classifier_and_guided_sampler_steps():
    cfg = dict(guided.PRESETS["tiny"], out_ch=6, num_classes=None)
    x, y, caps = shapes_batch(cfg)
    model = common.build_unet(cfg)
    loss_fn, sample_fn = guided.objective(cfg, CPU)
    no_float64(sgd_step(model, lambda: loss_fn(model, x, y, caps)))             # the hybrid loss (L_vlb too)
    clf = guided.build_classifier(guided.classifier_config(cfg, 4))
    diff = guided.diffusion_from(cfg, device=CPU)
    no_float64(sgd_step(clf, lambda: guided.classifier_loss(clf, diff, x, y)))
    guide = guided.make_guide(clf.eval(), y, 2.0)
    short = guided.respace(diff, 5)
    for sampler in ("ancestral", "ddim"):
        no_float64(lambda: short.sample(model.eval(), (2, 3, 16, 16), CPU, guide=guide, sampler=sampler))


def test_ddgan_training_step_with_r1_and_sampler():
    cfg = dict(ddgan.PRESETS["tiny"])
    x = shapes_batch(cfg, 4)[0]
    G, D = ddgan.Generator(cfg), ddgan.Discriminator(cfg)
    opt_g, opt_d = (common.make_optimizer(m.parameters(), 1e-4, device=CPU) for m in (G, D))
    sched = ddgan.schedule_from(cfg, CPU)
    ops = no_float64(lambda: ddgan.train_step(G, D, opt_g, opt_d, sched, x, cfg, step=0))  # step 0: R1 too
    assert "convolution_backward" in ops
    no_float64(lambda: ddgan.sample(G, sched, 2, x.shape[1:], CPU))


def test_ldm_both_stages_and_guided_latent_sampler():
    cfg = dict(ldm.PRESETS["tiny"], cond="text", scale_factor=1.0)
    cfg["vocab"] = common.WordTokenizer.build(ldm.training_captions(common.ShapesData(16, 3), 50),
                                              cfg["max_len"]).vocab
    x, y, caps = shapes_batch(cfg)
    ae, disc = common.AutoencoderKL(ldm.ae_config(cfg)), ldm.PatchDiscriminator(3, cfg["disc_ch"])
    no_float64(sgd_step(ae, lambda: ldm.ae_losses(ae, x, ldm.ae_config(cfg), disc, use_gan=True)[0]))
    net, cond = common.LDM(cfg), ldm.Conditioner(cfg)
    abar = ldm.alphas_cumprod(cfg)
    abar_dev, abar_list = common.on_device(CPU)(abar), abar.tolist()
    z0 = ldm.DiagonalGaussian(*ae.encode(x)).sample().detach()
    no_float64(sgd_step(net, lambda: ldm.ldm_loss(net, z0, cond.drop(cond(caps), 0.1), abar_dev)))
    eps_fn = common.guided_eps_fn(net.eval(), cond(caps), cond.null(2), 3.0)
    no_float64(lambda: ae.decode(common.sample_latents(eps_fn, torch.randn_like(z0), abar_list, 3)))


def test_dreambooth_loss_and_sampler(tmp_path):
    cfg = dict(ldm.PRESETS["tiny"], cond="text", scale_factor=1.0)
    cfg["vocab"] = common.WordTokenizer.build(["a sks circle", "a circle"], cfg["max_len"]).vocab
    model, ae = common.LDM(cfg), common.AutoencoderKL(ldm.ae_config(cfg))
    tok = common.WordTokenizer(cfg["vocab"], cfg["max_len"])
    abar = common.on_device(CPU)(common.alphas_cumprod(cfg))
    z0, tokens = torch.randn(4, 4, 4, 4), tok(["a sks circle"] * 2 + ["a circle"] * 2)
    no_float64(sgd_step(model, lambda: dreambooth.dreambooth_loss(model, z0, tokens, 2, abar)[0]))
    abar_list = common.alphas_cumprod(cfg).tolist()
    no_float64(lambda: dreambooth.sample(model.eval(), ae, cfg, tok, ["a sks circle"] * 2, steps=3,
                                         abar=abar_list))


def test_evaluation_features_and_judge_predictions():
    judge = common.Judge(common.SHAPE_HEADS, 3).eval()
    x = shapes_batch(dict(image_size=16, channels=3), 8)[0]
    f = []
    no_float64(lambda: f.append(common.features(judge, x)))
    no_float64(lambda: common.judge_predict(judge, x))
    # statistics cast to float64 on the CPU after
    assert f[0].dtype == torch.float32 and f[0].device == CPU
