"""Stable Diffusion v1 through --weights, against the reference libraries (skipped without them): tiny random
diffusers/transformers models (UNet2DConditionModel with SD's block types, AutoencoderKL, CLIPTextModel, a
CLIPTokenizer on a vocabulary written here) saved as a diffusers folder and loaded by common.py give the same
outputs; the same tiny model written in CompVis' single-file layout is read the same by us and by diffusers'
own converters; Lightning .ckpt files load through inert stand-ins and code in a pickle is refused; full-size
SD v1 names and shapes on the meta device; our BPE tokenizer equals transformers'; the released sampler
(DDIM, timesteps i T / S + 1, guidance against the empty prompt) equals diffusers' pipeline; the command lines
of ldm.py and dreambooth.py on the tiny folder."""

import collections
import json
import os
import pickle
import re
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image

import common
import dreambooth
import ldm

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = [
    "a photograph of an astronaut riding a horse",
    "a photo of a dog, sitting on the grass!",
    "the quick brown fox jumps over the lazy dog 123 times",
    "don't you're we'll they've i'm she'd it's",
    "café naïve résumé",
    "a photo of a sks dog on the beach",
] * 3
TEXTS = [
    "a photograph of an astronaut riding a horse",
    "A Photo, of a DOG!!! sitting... 12345 x 3.14",
    "don't you're it's 'quoted' we'll",
    "café naïve résumé Zürich 東京 Ελληνικά",
    "emoji 🐶🚀 ok 👍🏽",
    "  spaces\tand\nnewlines  ",
    "",
    "word " * 100,
    "x²½ ①",
    "!!'s",
    "sks dog",
]


def learn_merges(n=150):
    """Byte-level BPE merges learned on CORPUS (most frequent pair first): a real, small vocabulary."""
    sym = common.byte_alphabet()
    words = collections.Counter()
    for text in CORPUS:
        for piece in common.clip_pieces(text.lower()):
            s = [sym[b] for b in piece.encode()]
            words[tuple(s[:-1] + [s[-1] + "</w>"])] += 1
    merges = []
    for _ in range(n):
        pairs = collections.Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return merges


def write_vocab(folder):
    merges = learn_merges()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(common.ClipTokenizer(merges).index, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return merges


def tiny_models(vocab_size, seed=0):
    """Random tiny references with Stable Diffusion v1's structure: 3 U-Net levels (cross-attention in the
    first two), 8 heads, context 64; a 3-level KL autoencoder (f = 4) with 32 groups; a 2-layer CLIP text
    encoder of width 64 with one head (a single file does not say its heads: CLIP's text encoders have one per
    64 channels).
    """
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1,
        sample_size=32,
    )
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=1,
            intermediate_size=256,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
        )
    )
    with torch.no_grad():  # the zero-initialized output layers must not hide what the weights do
        for m in (unet, vae):
            for p in m.parameters():
                p.add_(torch.randn(p.shape) * 0.05)
    return unet.eval(), vae.eval(), text.eval()


SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny Stable Diffusion saved as diffusers saves a pipeline: unet/, vae/, text_encoder/, tokenizer/,
    scheduler/."""
    root = tmp_path_factory.mktemp("sd") / "tiny-sd"
    write_vocab(str(root / "tokenizer"))
    tok = transformers.CLIPTokenizer(
        str(root / "tokenizer" / "vocab.json"), str(root / "tokenizer" / "merges.txt"), model_max_length=77
    )
    unet, vae, text = tiny_models(len(tok))
    unet.save_pretrained(str(root / "unet"))
    vae.save_pretrained(str(root / "vae"))
    text.save_pretrained(str(root / "text_encoder"))
    os.makedirs(root / "scheduler")
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return str(root), (unet, vae, text, tok)


# --- the tokenizer ----------------------------------------------------------------------------------------


def test_bpe_tokenizer_equals_transformers(tmp_path):
    write_vocab(str(tmp_path))
    ref = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = common.ClipTokenizer.load(str(tmp_path))
    want = ref(TEXTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours(TEXTS).tolist() == want
    assert len(want[TEXTS.index("word " * 100)]) == 77 and want[-1][0] == ours.bos  # cut to 77, [start, ...]
    assert ours([""])[0, :3].tolist() == [ours.bos, ours.eos, ours.eos]  # the unconditional prompt


def test_bpe_vocab_file_gives_clips_ids(tmp_path):
    """bpe_simple_vocab_16e6.txt.gz's format (a header line, then merges): the vocabulary CLIP builds from it
    (bytes, bytes + '</w>', merges, the two specials) gives the ids of the equivalent vocab.json."""
    import gzip

    merges = write_vocab(str(tmp_path))
    with gzip.open(tmp_path / "bpe.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    a, b = common.ClipTokenizer.load(str(tmp_path / "bpe.txt.gz")), common.ClipTokenizer.load(str(tmp_path))
    assert a.index == b.index and torch.equal(a(TEXTS), b(TEXTS)) and len(a.index) == 512 + len(merges) + 2
    with pytest.raises(common.UserError, match="not CLIP's"):
        common.ClipTokenizer.load(str(tmp_path / "vocab.json"))


# --- the networks, from a diffusers folder ----------------------------------------------------------------


def test_diffusers_folder_gives_the_reference_outputs(sd_folder):
    path, (unet, vae, text, tok) = sd_folder
    model, ae, ours_tok, cfg = common.load_stable_diffusion(path)
    assert cfg["f"] == 4 and cfg["image_size"] == 32 and cfg["heads"] == 8 and cfg["attn_res"] == [8, 4]
    ids = ours_tok(["a photo of a dog", ""])
    with torch.no_grad():
        ref_ctx = text(ids).last_hidden_state
        ctx, mask = model.text(ids)
        assert mask is None and (ctx - ref_ctx).abs().max() <= 1e-5  # all 77 states, causal
        z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
        ref = unet(z, t, encoder_hidden_states=ref_ctx).sample
        assert (model.unet(z, t, context=ref_ctx) - ref).abs().max() <= 1e-5
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        mean, logvar = ae.encode(x)
        dist = vae.encode(x).latent_dist
        assert (mean - dist.mean).abs().max() <= 1e-5 and (logvar - dist.logvar).abs().max() <= 1e-5
        assert (ae.decode(mean) - vae.decode(dist.mean).sample).abs().max() <= 1e-5


def test_the_released_sampler_equals_diffusers_pipeline(sd_folder):
    """ldm.py's sampler for released weights (DDIM over i T / S + 1 ending at abar_0, guidance 7.5 against the
    empty prompt, latents / scaling factor) draws what diffusers' StableDiffusionPipeline draws with the DDIM
    scheduler configured as CompVis' sampler, from the same initial latents."""
    path, (unet, vae, text, tok) = sd_folder
    smp = ldm.Sampler(None, torch.device("cpu"), weights=path)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "_class_name"}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(5)
    z = torch.randn(1, 4, 8, 8)
    ref = pipe(
        "a photo of a dog",
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=7.5,
        latents=z,
        output_type="pt",
    ).images
    torch.manual_seed(5)
    ours = smp.sample(["a photo of a dog"], scale=7.5, steps=4)
    assert (ours / 2 + 0.5 - ref).abs().max() <= 1e-4


# --- CompVis' single file ---------------------------------------------------------------------------------


def ours_to_compvis(model, ae):
    """Our tensors under CompVis' names (the inverse renaming, written out here independently of common.py):
    the U-Net in OpenAI's layout, the autoencoder in taming's, the text encoder in transformers'."""
    block_names = [
        (r"^time_mlp\.", "time_embed."),
        (r"^conv_in\.", "input_blocks.0.0."),
        (r"^down\.(\d+)\.", lambda m: f"input_blocks.{int(m[1]) + 1}."),
        (r"^mid\.", "middle_block."),
        (r"^up\.", "output_blocks."),
    ]
    resblock_names = [
        (r"\.norm1\.", ".in_layers.0."),
        (r"\.conv1\.", ".in_layers.2."),
        (r"\.emb\.", ".emb_layers.1."),
        (r"\.norm2\.", ".out_layers.0."),
        (r"\.conv2\.", ".out_layers.3."),
        (r"\.skip\.", ".skip_connection."),
    ]
    transformer_names = [
        (r"\.(norm[123]|attn[12]|ff)\.", r".transformer_blocks.0.\1."),
        (r"\.attn([12])\.q\.", r".attn\1.to_q."),
        (r"\.attn([12])\.out\.", r".attn\1.to_out.0."),
        (r"\.ff\.0\.proj\.", ".ff.net.0.proj."),
        (r"\.ff\.1\.", ".ff.net.2."),
    ]
    transformers_at = tuple(
        n + "." for n, m in model.unet.named_modules() if isinstance(m, common.SpatialTransformer)
    )
    out = {}
    for k, v in model.unet.state_dict().items():
        new = k
        for p, r in block_names + (transformer_names if k.startswith(transformers_at) else resblock_names):
            new = re.sub(p, r, new)
        if re.match(r"^down\.\d+\.0\.conv\.", k):  # the Downsample conv: 'op'
            new = new.replace(".0.conv.", ".0.op.")
        out["model.diffusion_model." + new] = v
    for k, v in ae.state_dict().items():
        new = re.sub(r"\.skip\.", ".nin_shortcut.", k)
        new = re.sub(r"^encoder\.down\.(\d+)\.resample\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.resample\.", r"decoder.up.\1.upsample.", new)
        new = new.replace(".mid.0.", ".mid.block_1.").replace(".mid.2.", ".mid.block_2.")
        new = new.replace(".mid.1.attn.out.", ".mid.attn_1.proj_out.").replace(
            ".mid.1.attn.q.", ".mid.attn_1.q."
        )
        new = new.replace(".mid.1.attn.kv.", ".mid.attn_1.kv.")
        new = new.replace(".mid.1.", ".mid.attn_1.")
        conv = v[..., None, None] if re.search(r"attn_1\.(q|kv|proj_out)\.weight$", new) else v
        out["first_stage_model." + new] = conv
    for k, v in model.text.state_dict().items():
        new = {
            "tok.weight": "embeddings.token_embedding.weight",
            "pos": "embeddings.position_embedding.weight",
            "ln.weight": "final_layer_norm.weight",
            "ln.bias": "final_layer_norm.bias",
        }.get(k, k)
        for p, r in [
            (r"^blocks\.", "encoder.layers."),
            (r"\.attn\.q\.", ".self_attn.q_proj."),
            (r"\.attn\.kv\.", ".self_attn.kv."),
            (r"\.attn\.out\.", ".self_attn.out_proj."),
            (r"\.ln(\d)\.", r".layer_norm\1."),
            (r"\.ff\.0\.", ".mlp.fc1."),
            (r"\.ff\.2\.", ".mlp.fc2."),
        ]:
            new = re.sub(p, r, new)
        out["cond_stage_model.transformer.text_model." + new] = v
    split = {
        r"(\.attn[12])\.kv\.": (r"\1.to_k.", r"\1.to_v."),
        r"\.self_attn\.kv\.": (".self_attn.k_proj.", ".self_attn.v_proj."),
        r"\.attn_1\.kv\.": (".attn_1.k.", ".attn_1.v."),
    }  # our fused kv -> k and v
    for pattern, (k_name, v_name) in split.items():
        for key in [k for k in out if re.search(pattern, k)]:
            k, v = out.pop(key).chunk(2)
            out[re.sub(pattern, k_name, key)], out[re.sub(pattern, v_name, key)] = k, v
    out["betas"], out["model_ema.decay"] = torch.zeros(1000), torch.tensor(0.9999)  # a real file carries them
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def test_compvis_file_reads_as_diffusers_converters_read_it(sd_folder, tmp_path):
    path, (unet, vae, text, tok) = sd_folder
    model, ae, _, cfg = common.load_stable_diffusion(path)
    compvis = ours_to_compvis(model, ae)
    # diffusers' own converters, CompVis -> diffusers, loaded strictly into the reference classes
    ref_unet = diffusers.UNet2DConditionModel.from_config(unet.config).eval()
    ref_unet.load_state_dict(single_file_utils.convert_ldm_unet_checkpoint(compvis, dict(unet.config)))
    ref_vae = diffusers.AutoencoderKL.from_config(vae.config).eval()
    ref_vae.load_state_dict(single_file_utils.convert_ldm_vae_checkpoint(compvis, dict(vae.config)))
    clip = single_file_utils.convert_ldm_clip_checkpoint(compvis)
    ref_text = transformers.CLIPTextModel(text.config).eval()
    prefix = "" if "embeddings.token_embedding.weight" in ref_text.state_dict() else "text_model."
    ref_text.load_state_dict(
        {prefix + k.removeprefix("text_model."): v for k, v in clip.items() if not k.endswith("position_ids")}
    )
    # ours, from the same tensors written as a .safetensors single file
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in compvis.items()}, str(tmp_path / "sd.safetensors"))
    ours, ours_ae, _, ocfg = common.load_stable_diffusion(
        str(tmp_path / "sd.safetensors"), tokenizer=os.path.join(path, "tokenizer"), image_size=32
    )
    assert (
        ocfg["attn_res"] == cfg["attn_res"] and ocfg["scale_factor"] == 0.18215 and ocfg["ddim_offset"] == 1
    )
    ids = torch.tensor([[1, 5, 9, 3] + [2] * 73])
    z, t, x = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ctx = ref_text(ids).last_hidden_state
        assert (ours.text(ids)[0] - ctx).abs().max() <= 1e-5
        ctx2 = torch.cat([ctx, ctx.flip(1)])
        assert (
            ours.unet(z, t, context=ctx2) - ref_unet(z, t, encoder_hidden_states=ctx2).sample
        ).abs().max() <= 1e-5
        dist = ref_vae.encode(x).latent_dist
        assert (ours_ae.encode(x)[0] - dist.mean).abs().max() <= 1e-5
        assert (ours_ae.decode(dist.mean) - ref_vae.decode(dist.mean).sample).abs().max() <= 1e-5


def fake_lightning():
    """A stand-in for pytorch_lightning's ModelCheckpoint, importable by pickle while the test writes a
    .ckpt."""
    for name in (
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    ):
        sys.modules.setdefault(name, types.ModuleType(name))
    mod = sys.modules["pytorch_lightning.callbacks.model_checkpoint"]

    class ModelCheckpoint:
        def __init__(self):
            import numpy as np

            self.best_model_score, self.dtype = np.float64(0.25), np.dtype("float32")

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    return ModelCheckpoint


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_lightning_ckpt_loads_with_weights_only_and_code_is_refused(tmp_path):
    import numpy as np

    cb = fake_lightning()
    state = {"model.diffusion_model.x": torch.ones(2), "first_stage_model.y": torch.zeros(3)}
    torch.save(
        {
            "state_dict": state,
            "global_step": 470000,
            "epoch": 6,
            "callbacks": {cb: {"best": np.float64(1.5)}},
            "checkpoint_callback_best": cb(),
            "pytorch-lightning_version": "1.4.2",
        },
        tmp_path / "sd.ckpt",
    )
    tensors = common.read_weights(str(tmp_path / "sd.ckpt"))[0]
    assert (
        tensors.keys() == state.keys()
        and torch.equal(tensors["model.diffusion_model.x"], state["model.diffusion_model.x"])
        and common.weights_layout(tensors) == "compvis"
    )
    torch.save({"state_dict": state, "evil": RunsCode()}, tmp_path / "evil.ckpt")
    with pytest.raises(common.UserError, match="refused"):
        common.read_weights(str(tmp_path / "evil.ckpt"))


# --- full size, on the meta device ------------------------------------------------------------------------

SD_V1_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD_V1_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
)


def test_full_size_sd_v1_names_and_shapes_on_meta():
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SD_V1_UNET).state_dict()
        vae = diffusers.AutoencoderKL(**SD_V1_VAE).state_dict()
        text = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                max_position_embeddings=77,
            )
        ).state_dict()
        u, a, t = (
            common.unet_from_sd(unet, "diffusers"),
            common.ae_from_sd(vae, "diffusers"),
            common.text_from_clip(text),
        )
        cfg = common.sd_config(u, a, t, 512, 8, 12)
        model, ae = common.LDM(cfg), common.AutoencoderKL(cfg)
    assert cfg["ch"] == 320 and cfg["ch_mult"] == [1, 2, 4, 4] and cfg["attn_res"] == [64, 32, 16]
    assert cfg["context_dim"] == 768 and cfg["text_layers"] == 12 and cfg["f"] == 8 and cfg["ae_ch"] == 128
    for ours, theirs in ((model.unet, u), (model.text, t), (ae, a)):
        assert common.check_mapping(ours, theirs) == ([], [], [])
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert (round(n(model.unet) / 1e6, 1), round(n(ae) / 1e6, 1), round(n(model.text) / 1e6, 1)) == (
        859.5,
        83.7,
        123.1,
    )


# --- the blocks Stable Diffusion's design asks for --------------------------------------------------------


def test_cross_attention_block_starts_as_the_identity():
    torch.manual_seed(0)
    blk = common.SpatialTransformer(32, 4, context_dim=16)
    x = torch.randn(2, 32, 4, 4)
    assert torch.equal(blk(x, torch.randn(2, 5, 16)), x)  # zero-initialized proj_out, as released
    assert blk.norm.eps == 1e-6 and blk.attn1.q.bias is None and blk.attn2.kv.bias is None


# --- the command lines ------------------------------------------------------------------------------------


def run(script, *args):
    return subprocess.run(
        [sys.executable, script, *args, "--threads", "1", "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_cli_ldm_samples_from_a_diffusers_folder(sd_folder, tmp_path):
    path = sd_folder[0]
    p = run(
        "ldm.py",
        "--sample",
        "--weights",
        path,
        "--prompt",
        "a photo of a dog",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "o"),
    )
    assert p.returncode == 0, p.stderr
    assert Image.open(tmp_path / "o" / "samples.png").size == (32 + 2 * 2, 32 + 2 * 2)
    p = run("ldm.py", "--sample", "--weights", path, "--steps", "2", "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "--prompt" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run(
        "ldm.py",
        "--sample",
        "--weights",
        os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"),
        "--prompt",
        "a dog",
        "--out",
        str(tmp_path / "o"),
    )
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


def test_cli_dreambooth_fine_tunes_sd_then_samples(sd_folder, tmp_path):
    path = sd_folder[0]
    subject = tmp_path / "dog"
    subject.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 48), (40 * i, 120, 200)).save(subject / f"{i}.png")
    out = str(tmp_path / "db")
    p = run(
        "dreambooth.py",
        "--train",
        "--weights",
        path,
        "--data",
        str(subject),
        "--class-prompt",
        "a photo of a dog",
        "--max-steps",
        "2",
        "--num-class-images",
        "2",
        "--steps",
        "2",
        "--n-samples",
        "1",
        "--out",
        out,
    )
    assert p.returncode == 0, p.stderr
    assert "'a photo of a sks dog'" in p.stdout and len(os.listdir(os.path.join(out, "class_dog"))) == 2
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["step"] == 2 and ck["dreambooth"]["weights"] == os.path.abspath(path)
    assert all(k.startswith("unet.") for k in ck["model"])  # only the trained network is kept
    p = run("dreambooth.py", "--sample", "--out", out, "--steps", "2", "--prompt", "a sks dog on the moon")
    assert p.returncode == 0, p.stderr
    assert Image.open(os.path.join(out, "samples.png")).size == (32 + 2 * 2, 32 + 2 * 2)
