"""--weights plumbing: the .safetensors reader (standard library + torch) against the format and against
the safetensors package, torch.load(weights_only=True) for .pt/.bin, layouts told from tensor names, one-line
errors, and the command line: a tiny saved model through --weights writes a PNG; a wrong file is one error
line."""
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from PIL import Image

import common
import ddgan
import ddim
import ddpm
import guided
import ldm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_weights_adm import openai_unet_shapes, random_tensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def mixed_tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    return {"f64": x.double(), "f32": x, "f16": x.half(), "bf16": x.bfloat16(), "i64": torch.arange(7) - 3,
            "i32": torch.arange(4, dtype=torch.int32), "i16": torch.tensor([-2, 9], dtype=torch.int16),
            "i8": torch.tensor([[-1, 2]], dtype=torch.int8), "u8": torch.tensor([0, 255], dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4)}


def write_safetensors(path, tensors, metadata=None):
    """The format written out by hand: u64 header length, JSON header, then the raw bytes of each tensor."""
    name_of = {v: k for k, v in DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for k, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[k] = {"dtype": name_of[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_safetensors_reader_reads_the_format(tmp_path):
    tensors = mixed_tensors()
    write_safetensors(tmp_path / "m.safetensors", tensors, {"format": "pt"})
    assert_same(common.read_safetensors(str(tmp_path / "m.safetensors")), tensors)


def test_safetensors_reader_equals_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch", exc_type=ImportError, reason="the comparison needs the "
                             "safetensors package (pip install -r requirements-dev.txt)")
    tensors = {k: v for k, v in mixed_tensors().items()}
    st.save_file(tensors, str(tmp_path / "p.safetensors"), metadata={"note": "written by the package"})
    ours = common.read_safetensors(str(tmp_path / "p.safetensors"))
    assert_same(ours, st.load_file(str(tmp_path / "p.safetensors")))
    write_safetensors(tmp_path / "h.safetensors", tensors)                 # and the package reads ours
    assert_same(st.load_file(str(tmp_path / "h.safetensors")), tensors)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident memory from /proc "
                                                                    "(Linux)")
def test_safetensors_reader_maps_the_file_instead_of_reading_it(tmp_path):
    write_safetensors(tmp_path / "big.safetensors", {"w": torch.ones(64, 1024, 1024, dtype=torch.uint8)})
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    before = rss()
    w = common.read_safetensors(str(tmp_path / "big.safetensors"))["w"]
    assert rss() - before < 16 * 2 ** 20                                   # 64 MB file, not read in
    assert w[-1, -1, -1].item() == 1 and w[5].sum().item() == 2 ** 20      # and the data is there when read
    w.add_(1)                                                        # copy-on-write: the file is untouched
    assert common.read_safetensors(str(tmp_path / "big.safetensors"))["w"][0, 0, 0].item() == 1


def test_safetensors_damage_is_one_clear_error(tmp_path):
    write_safetensors(tmp_path / "m.safetensors", mixed_tensors())
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(common.UserError, match=r"is truncated: tensor \w+ ends at byte \d+, the file has"):
        common.read_weights(str(tmp_path / "cut.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(common.UserError, match="not a .safetensors file"):
        common.read_weights(str(tmp_path / "junk.safetensors"))
    (tmp_path / "nojson.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(common.UserError, match="header is not JSON"):
        common.read_weights(str(tmp_path / "nojson.safetensors"))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_torch_files_load_only_tensors(tmp_path):
    sd = {"a.weight": torch.randn(2, 3), "b": torch.arange(3)}
    torch.save(sd, tmp_path / "new.pt")
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)   # pre-1.6 format: no mmap
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.ckpt")
    for name in ("new.pt", "old.pt", "wrapped.ckpt"):
        assert_same(common.read_weights(str(tmp_path / name))[0], sd)
    torch.save({"w": torch.ones(1), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(common.UserError, match="refused to load it"):
        common.read_weights(str(tmp_path / "evil.pt"))
    torch.save({"script": "ddpm", "config": {}, "ema": sd}, tmp_path / "ours.pt")
    with pytest.raises(common.UserError, match="is a ddpm.py checkpoint of this repository; pass it with "
                                               "--ckpt"):
        common.read_weights(str(tmp_path / "ours.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(common.UserError, match="not a state dict"):
        common.read_weights(str(tmp_path / "list.pt"))
    with pytest.raises(common.UserError, match="no such file"):
        common.read_weights(str(tmp_path / "missing.pt"))


LAYOUT_KEYS = {
    "diffusers-unet": ["conv_in.weight", "time_embedding.linear_1.weight",
                       "down_blocks.0.resnets.0.conv1.weight"],
    "diffusers-unet-cond": ["conv_in.weight", "time_embedding.linear_1.weight",
                            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"],
    "openai-unet": ["time_embed.0.weight", "input_blocks.0.0.weight", "output_blocks.0.0.in_layers.0.weight"],
    "openai-classifier": ["time_embed.0.weight", "input_blocks.0.0.weight", "out.2.positional_embedding"],
    "compvis": ["model.diffusion_model.time_embed.0.weight", "first_stage_model.encoder.conv_in.weight"],
    "vae": ["encoder.conv_in.weight", "decoder.conv_in.weight", "quant_conv.weight"],
    "clip-text": ["text_model.embeddings.token_embedding.weight"],
    "inception": ["Mixed_7c.branch_pool.conv.weight", "fc.weight"],
    "nano-unet": ["time_mlp.0.weight", "conv_in.weight", "down.0.0.norm1.weight"],
    "unknown": ["layer1.weight", "layer2.bias"],
}


@pytest.mark.parametrize("layout", list(LAYOUT_KEYS))
def test_layout_is_told_from_the_tensor_names(layout):
    tensors = {k: torch.zeros(1) for k in LAYOUT_KEYS[layout]}
    assert common.weights_layout(tensors) == layout
    if layout in ("openai-unet", "diffusers-unet"):
        return
    with pytest.raises(common.UserError) as e:
        common.check_layout("x.pt", tensors, ["openai-unet"], "guided")
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("guided.py --weights loads an OpenAI U-Net (guided-diffusion / "
                                            "improved-diffusion)")
    assert ("unknown layout (2 tensors, e.g. layer1.weight" in msg) == (layout == "unknown")


def test_scripts_without_a_loader_refuse_weights(tmp_path):
    with pytest.raises(common.UserError, match=r"--weights: \w+\.py loads no released weights"):
        ddgan.main(["--sample", "--weights", "anything.pt"])
    with pytest.raises(common.UserError, match=r"no such file"):              # ldm.py loads Stable Diffusion
        ldm.main(["--sample", "--weights", "anything.pt", "--prompt", "a dog", "--out", str(tmp_path)])


def run(*args):
    return subprocess.run([sys.executable, *args, "--threads", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_guided_samples_from_released_layout_and_refuses_wrong_files(tmp_path):
    shapes, _ = openai_unet_shapes(32, [1, 2], 1, (2,), num_classes=4, out_ch=6)
    torch.save(random_tensors(shapes), tmp_path / "adm.pt")
    out = tmp_path / "o"
    p = run("guided.py", "--sample", "--weights", str(tmp_path / "adm.pt"), "--image-size", "16",
            "--head-channels", "16", "--qkv-order", "new", "--schedule", "cosine", "--timesteps", "50",
            "--n-samples", "2", "--steps", "2", "--class", "3", "--no-gif", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert Image.open(out / "samples.png").size == (2 * 16 + 3 * 2, 16 + 2 * 2)
    assert "released weights" in p.stdout
    # 1000 classes and no --class: classes drawn at random, in a square grid (not 1000 columns)
    shapes = openai_unet_shapes(32, [1, 2], 1, (2,), num_classes=1000, out_ch=6)[0]
    torch.save(random_tensors(shapes), tmp_path / "imagenet.pt")
    guided.main(["--sample", "--weights", str(tmp_path / "imagenet.pt"), "--image-size", "16",
                 "--head-channels", "16", "--qkv-order", "new", "--schedule", "cosine", "--timesteps", "20",
                 "--n-samples", "4", "--steps", "2", "--no-gif", "--out", str(tmp_path / "i")])
    assert Image.open(tmp_path / "i" / "samples.png").size == (2 * 16 + 3 * 2,) * 2
    p = run("ddpm.py", "--sample", "--weights", str(tmp_path / "adm.pt"), "--out", str(tmp_path / "e"))
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: --weights {tmp_path / 'adm.pt'}: found an OpenAI U-Net (guided-diffusion / "
        "improved-diffusion), which guided.py --weights loads; ddpm.py --weights loads a diffusers "
        "UNet2DModel (DDPM's U-Net)"]
    write_safetensors(tmp_path / "wrong.safetensors", {"layer.weight": torch.zeros(2)})
    for module, path, what in ((guided, "wrong.safetensors", "unknown layout"),
                               (ddim, "adm.pt", "OpenAI U-Net"), (guided, "missing.pt", "no such file")):
        with pytest.raises(common.UserError, match=f"^--weights .*{what}"):
            module.main(["--sample", "--weights", str(tmp_path / path), "--out", str(tmp_path / "e")])


def test_cli_ddpm_and_ddim_sample_from_a_saved_unet2dmodel(tmp_path):
    diffusers = pytest.importorskip("diffusers", exc_type=ImportError, reason="saving a UNet2DModel needs "
                                    "diffusers (pip install -r requirements-dev.txt)")
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=16, block_out_channels=(32, 32), layers_per_block=1,
                          attention_head_dim=None, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          norm_num_groups=8, up_block_types=("AttnUpBlock2D", "UpBlock2D")
                          ).save_pretrained(tmp_path / "m")
    p = run("ddpm.py", "--sample", "--weights", str(tmp_path / "m"), "--n-samples", "2", "--steps", "2",
            "--out", str(tmp_path / "ddpm"))
    assert p.returncode == 0, p.stderr
    ddim.main(["--sample", "--weights", str(tmp_path / "m"), "--n-samples", "2", "--steps", "2", "--out",
               str(tmp_path / "ddim")])
    for script in ("ddpm", "ddim"):
        assert Image.open(tmp_path / script / "samples.png").size == (2 * 16 + 3 * 2, 16 + 2 * 2)
    with pytest.raises(common.UserError, match="^--weights loads a released model to --sample or --eval"):
        ddpm.main(["--train", "--weights", str(tmp_path / "m"), "--out", str(tmp_path / "t")])
