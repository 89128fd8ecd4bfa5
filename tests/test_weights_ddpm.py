"""ddpm.py / ddim.py --weights: DDPM's released models as diffusers ported them (the UNet2DModel layout). A
tiny random UNet2DModel with the CIFAR-10 block types, saved with save_pretrained, must give our network the
same output; the full-size CIFAR-10 and 256 px layouts must map key for key. diffusers is the reference: these
tests skip without it (pip install -r requirements-dev.txt)."""
import argparse
import json

import pytest
import torch

import common
import ddim
import ddpm

diffusers = pytest.importorskip("diffusers", reason="the DDPM equivalence tests need diffusers, the "
                                                    "reference (pip install -r requirements-dev.txt)")

# google/ddpm-cifar10-32's config.json (the published one, as the diffusers port wrote it)
CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
               down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
               attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
               norm_num_groups=32, downsample_padding=0, act_fn="silu", center_input_sample=False,
               mid_block_scale_factor=1, time_embedding_type="positional")
# the 256 px ones (celebahq, church, bedroom, cat): six levels, attention at 16 x 16
LSUN = dict(CIFAR10, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
            down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4)
# 32 groups at width 32, one channel each, where our default would pick 8
TINY = dict(CIFAR10, sample_size=16, block_out_channels=[32, 64, 64, 64])


def weights_args(path, **kw):
    return argparse.Namespace(**{"weights": path, "image_size": None, "objective": None, "var": None,
                                 "schedule": None, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random UNet2DModel with CIFAR-10's block types, saved both ways, a DDPM scheduler beside it."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**TINY).eval()
    with torch.no_grad():   # random everywhere (the released zero-initialised layers are trained), unit-scale
        for name, p in ref.named_parameters():
            if p.ndim > 1:
                p.normal_(0, p[0].numel() ** -0.5)
            else:
                gain = "norm" in name and "weight" in name
                p.copy_(1 + 0.2 * torch.randn_like(p) if gain else 0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("ddpm")
    ref.save_pretrained(root / "st")                                 # diffusion_pytorch_model.safetensors
    ref.save_pretrained(root / "bin", safe_serialization=False)     # diffusion_pytorch_model.bin
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                    variance_type="fixed_large", clip_sample=True)
    sched.save_pretrained(root / "st")
    return ref, sched, root


def reference_and_ours(ref, model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([7, 951])
    with torch.no_grad():
        return ref(x, t).sample, model(x, t)


@pytest.mark.parametrize("folder", ["st", "bin"])
def test_saved_unet2dmodel_gives_the_same_output(tiny, folder):
    ref, _, root = tiny
    model, diff, ck = ddpm.load_weights(weights_args(str(root / folder)), torch.device("cpu"))
    a, b = reference_and_ours(ref, model)
    assert a.abs().mean() > 0.3
    assert (a - b).abs().max() <= 1e-5
    assert ck["config"]["tf_pad"] and ck["config"]["emb_shift"] == 1 and ck["config"]["norm_eps"] == 1e-6
    model, abar, _ = ddim.load_weights(argparse.Namespace(weights=str(root / folder), image_size=None),
                                       torch.device("cpu"))
    assert (a - reference_and_ours(ref, model)[1]).abs().max() <= 1e-5 and len(abar) == 1000


def test_each_exact_match_option_is_needed(tiny):
    """DDPM's TensorFlow details change the output: without any one of them the 1e-5 match is lost
    (GroupNorm's eps the least: it matters where a group's variance is small)."""
    ref, _, root = tiny
    cfg, tensors, _ = common.load_diffusers_ddpm(str(root / "st"), "ddpm")
    for change in (dict(tf_pad=False), dict(emb_shift=0), dict(norm_eps=1e-5), dict(norm_groups=None),
                   dict(emb_cos_first=True)):
        model = common.load_mapped(common.build_unet({**cfg, **change}), tensors, "tiny").eval()
        a, b = reference_and_ours(ref, model)
        assert (a - b).abs().max() > (2e-5 if "norm_eps" in change else 1e-3), change


def test_old_attention_names_load_too(tiny, tmp_path):
    """Older uploads name the attention query/key/value/proj_attn; diffusers itself still reads them."""
    ref, _, root = tiny
    old = {}
    for k, v in common.read_safetensors(str(root / "st" / "diffusion_pytorch_model.safetensors")).items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{legacy}.")
        old[k] = v.clone()
    assert any(".proj_attn." in k for k in old)
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "diffusion_pytorch_model.bin")
    (tmp_path / "old" / "config.json").write_text((root / "st" / "config.json").read_text())
    model, _, _ = ddpm.load_weights(weights_args(str(tmp_path / "old")), torch.device("cpu"))
    again = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "old")).eval()
    a, b = reference_and_ours(ref, model)
    assert (a - b).abs().max() <= 1e-5
    assert (a - reference_and_ours(again, model)[0]).abs().max() == 0      # the old names are real ones


def test_one_ancestral_step_matches_ddpmscheduler(tiny):
    """Algorithm 2's step with x_0 clipped and sigma^2 = beta_t, as DDPMScheduler takes it, on the same noise.
    DDPMScheduler keeps its schedule in float32 (its cumulative product off by up to ~4e-5 relative by
    t = 600, and 1 - abar_t loses digits near t = 0); ours is computed in float64. So: the same schedule up to
    float32, and the same step when both run the schedule arithmetic in float64 (the network in float32)."""
    ref, sched, root = tiny
    model, _, ck = ddpm.load_weights(weights_args(str(root / "st")), torch.device("cpu"))
    assert ck["config"]["var"] == "large" and ck["config"]["schedule"] == "linear"
    diff = ddpm.diffusion_from(ck["config"])                               # device None: float64 on the CPU
    abar = torch.cumprod(1 - diff.betas, 0)
    torch.testing.assert_close(sched.alphas_cumprod.double(), abar, rtol=1e-4, atol=0)
    sched.alphas_cumprod = abar
    net = lambda x, t: model(x.float(), t)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in (600, 1):
        with torch.no_grad():
            eps = ref(x.float(), t).sample.double()
            theirs = sched.step(eps, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
            torch.manual_seed(5)
            ours = diff.p_sample(net, x, torch.full((2,), t))
        assert (ours - theirs).abs().max() <= 1e-5


def test_bare_weights_file_uses_the_released_configuration(tiny, tmp_path):
    """Without config.json the block widths name the google/ddpm-* model; the rest is DDPM's published
    settings."""
    meta = lambda cfg: {k: torch.empty(v.shape, device="meta") for k, v in unet_state(cfg).items()}
    for published in (CIFAR10, LSUN):
        tensors = meta(published)
        from_tensors = common.ddpm_released_config(tensors, "bare")
        assert common.unet_config_from_diffusers(from_tensors, "bare") == \
            common.unet_config_from_diffusers(published, "bare")
    ref, _, root = tiny
    bare = tmp_path / "tiny.safetensors"                                   # no config.json beside it
    bare.write_bytes((root / "st" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(common.UserError, match=r"block widths \[32, 64, 64, 64\] and no config.json"):
        ddpm.load_weights(weights_args(str(bare)), torch.device("cpu"))


def unet_state(config):
    with torch.device("meta"):
        return diffusers.UNet2DModel(**config).state_dict()


@pytest.mark.parametrize("published", [CIFAR10, LSUN], ids=["cifar10-32", "256px"])
def test_released_ddpm_keys_map_one_to_one(published):
    theirs = unet_state(published)
    cfg = common.unet_config_from_diffusers(published, "released")
    with torch.device("meta"):
        model = common.build_unet(cfg)
    ours = common.unet_from_diffusers(theirs, cfg["num_res_blocks"])
    assert common.check_mapping(model, ours) == ([], [], [])
    assert common.count_params(model) == sum(v.numel() for v in theirs.values())
    if published is CIFAR10:                       # the paper's CIFAR-10 network is ddpm.py's paper preset
        assert common.count_params(model) == 35_746_307
        with torch.device("meta"):
            assert common.count_params(common.build_unet(ddpm.PRESETS["paper"])) == 35_746_307


def test_unsupported_config_is_one_clear_error(tiny, tmp_path):
    _, _, root = tiny
    (tmp_path / "m").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (tmp_path / "m" / name).write_bytes((root / "st" / name).read_bytes())
    config = json.loads((root / "st" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "act_fn": "gelu"}))
    with pytest.raises(common.UserError, match="act_fn = 'gelu'; common.UNet matches only 'silu'"):
        ddpm.load_weights(weights_args(str(tmp_path / "m")), torch.device("cpu"))
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / "scheduler_config.json").write_text(json.dumps({"variance_type": "learned_range"}))
    with pytest.raises(common.UserError, match="learned_range variance"):
        ddpm.load_weights(weights_args(str(tmp_path / "m")), torch.device("cpu"))


def test_scheduler_settings_and_overrides(tiny, tmp_path):
    _, _, root = tiny
    (tmp_path / "scheduler").mkdir()       # a pipeline folder: unet/ beside scheduler/
    (tmp_path / "unet").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (tmp_path / "unet" / name).write_bytes((root / "st" / name).read_bytes())
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"num_train_timesteps": 500, "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small",
         "prediction_type": "v_prediction"}))
    _, diff, ck = ddpm.load_weights(weights_args(str(tmp_path)), torch.device("cpu"))
    assert (diff.T, diff.var, diff.objective, ck["config"]["schedule"]) == (500, "small", "v", "cosine")
    args = weights_args(str(tmp_path), var="large", image_size=32)
    _, diff, ck = ddpm.load_weights(args, torch.device("cpu"))
    assert diff.var == "large" and ck["config"]["image_size"] == 32 and ck["config"]["attn_res"] == [16]
