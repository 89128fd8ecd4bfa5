"""dreambooth.py: its sampler on the shared networks gives ldm.py's samples; the identifier joins the
vocabulary (new embedding row, old ids kept); the loss of eq. 2 on a batch ordered [instance..., class...]
against a manual computation, and --no-prior's instance-only loss; the base stays frozen; the command line on
a tiny ldm.py checkpoint (fine-tune, then sample) and its errors."""
import argparse
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import dreambooth
import ldm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jitter(module, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A tiny, untrained (jittered) ldm.py text checkpoint with the shapes vocabulary, saved as ldm.py
    does."""
    cfg = dict(ldm.PRESETS["tiny"], cond="text", scale_factor=1.3)
    caps = ldm.training_captions(common.ShapesData(16, 3), n=300)
    cfg["vocab"] = common.WordTokenizer.build(caps, cfg["max_len"]).vocab
    torch.manual_seed(0)
    model, ae = jitter(common.LDM(cfg)), jitter(common.AutoencoderKL(ldm.ae_config(cfg)), seed=1)
    path = str(tmp_path_factory.mktemp("base") / "ckpt.pt")
    common.save_checkpoint({"script": "ldm", "kind": "ldm", "config": cfg, "model": model.state_dict(),
                            "ema": model.state_dict(), "ae": ae.state_dict(), "ae_config": ldm.ae_config(cfg),
                            "step": 0, "seed": 0}, path)
    return path


def base_args(path):
    return argparse.Namespace(weights=None, tokenizer=None, image_size=None, base=path)


def test_sampler_matches_ldm(base_ckpt):
    smp = ldm.Sampler(base_ckpt, torch.device("cpu"))
    model, ae, tok, cfg, _ = dreambooth.load_base(base_args(base_ckpt))
    caps = ["a red circle", "a large blue square on the left"]
    torch.manual_seed(3)
    ref = smp.sample(caps, scale=3.0, steps=4)
    torch.manual_seed(3)
    got = dreambooth.sample(model, ae, cfg, tok, caps, scale=3.0, steps=4)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(tok(caps), smp.cond.tok(caps))


def test_identifier_extends_the_vocabulary(base_ckpt):
    model, _, _, cfg, _ = dreambooth.load_base(base_args(base_ckpt))
    assert "sks" not in cfg["vocab"] and "circle" in cfg["vocab"]
    old_rows = model.text.tok.weight.clone()
    old_tokens = common.WordTokenizer(cfg["vocab"], 12)(["a red circle"])
    new = dreambooth.extend_vocab(model, cfg, ["sks"])
    tok = common.WordTokenizer(new["vocab"], new["max_len"])
    assert new["vocab"][-1] == "sks" and new["vocab"][:-1] == cfg["vocab"] and not tok.unknown("a sks circle")
    assert model.text.tok.weight.shape[0] == len(cfg["vocab"]) + 1
    assert torch.equal(model.text.tok.weight[:-1], old_rows)                    # the trained rows are kept
    assert torch.equal(tok(["a red circle"]), old_tokens)                       # and so are the old ids
    assert tok(["a sks circle"])[0, 2].item() == len(cfg["vocab"])
    assert dreambooth.extend_vocab(model, new, ["sks"]) is new                  # already there: unchanged
    model.load_state_dict(model.state_dict())                                   # a consistent state dict


class Recorder(torch.nn.Module):
    """eps_theta stand-in: records its inputs, predicts a fixed function of them."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, z, t, tokens):
        self.seen = (z.detach().clone(), t.clone(), tokens.clone())
        return self.w * z + tokens[:, :1, None, None].float() * 0.1


def test_batch_order_and_prior_loss_against_manual():
    abar = common.alphas_cumprod(ldm.PRESETS["tiny"]).float()          # float32, as the script trains
    g = torch.Generator().manual_seed(0)
    z_inst, z_cls = torch.randn(2, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g) + 5
    tok_inst, tok_cls = torch.full((2, 5), 7), torch.full((3, 5), 4)
    z0, tokens = torch.cat([z_inst, z_cls]), torch.cat([tok_inst, tok_cls])   # [instance..., class...]
    t, eps = torch.randint(0, 1000, (5,), generator=g), torch.randn(5, 4, 4, 4, generator=g)
    net = Recorder()
    loss, logs = dreambooth.dreambooth_loss(net, z0, tokens, 2, abar, prior_weight=0.5, t=t, eps=eps)
    assert torch.equal(net.seen[2][:2], tok_inst) and torch.equal(net.seen[2][2:], tok_cls)
    a = abar[t].float().view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(net.seen[0], zt)
    # ||eps - eps_theta(z_t, c_id)||^2
    inst = F.mse_loss(net(zt[:2], t[:2], tok_inst), eps[:2])
    # ||eps' - eps_theta(z'_t', c_pr)||^2
    prior = F.mse_loss(net(zt[2:], t[2:], tok_cls), eps[2:])
    torch.testing.assert_close(loss, inst + 0.5 * prior)
    assert logs["inst"] == pytest.approx(inst.item()) and logs["prior"] == pytest.approx(prior.item())
    # --no-prior
    only, logs = dreambooth.dreambooth_loss(net, z_inst, tok_inst, 2, abar, t=t[:2], eps=eps[:2])
    torch.testing.assert_close(only, inst)
    assert "prior" not in logs


def run(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "dreambooth.py"), *args], capture_output=True,
                       text=True,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return r.returncode, r.stdout + r.stderr


def test_cli_train_then_sample_and_base_frozen(base_ckpt, tmp_path):
    before = {k: v.clone() for k, v in torch.load(base_ckpt, weights_only=True)["ema"].items()}
    out = str(tmp_path / "db")
    model, base = dreambooth.main(["--train", "--preset", "tiny", "--base", base_ckpt, "--out", out,
                                   "--num-class-images", "3", "--steps", "2", "--n-samples", "2",
                                   "--device", "cpu"])
    # the prior images, generated once
    assert len(os.listdir(os.path.join(out, "class_circle"))) == 3
    assert not any(p.requires_grad for p in base.parameters())                  # the frozen base
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k                                      # ... unchanged
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["script"] == "dreambooth" and "sks" in ck["config"]["vocab"] and ck["dreambooth"]["prior"]
    assert not torch.equal(ck["model"]["unet.conv_in.weight"], before["unet.conv_in.weight"])   # fine-tuned
    assert torch.equal(ck["model"]["text.blocks.0.ff.0.weight"], before["text.blocks.0.ff.0.weight"])
    assert os.path.exists(os.path.join(out, "samples.png"))
    rc, log = run("--sample", "--preset", "tiny", "--out", out, "--prompt", "a blue sks circle on the left",
                  "--steps", "2", "--n-samples", "2", "--device", "cpu")
    assert rc == 0, log
    assert "a blue sks circle on the left" in log and os.path.exists(os.path.join(out, "samples.png"))


def test_no_prior_and_text_encoder_compiled(base_ckpt, tmp_path, compiled):
    out = str(tmp_path / "np")
    before = torch.load(base_ckpt, weights_only=True)["ema"]
    dreambooth.main(["--train", "--preset", "tiny", "--base", base_ckpt, "--out", out, "--no-prior",
                     "--train-text-encoder", "--max-steps", "2", "--steps", "2", "--n-samples", "1",
                     "--device", "cpu", "--compile"])
    assert [type(m) for m in compiled] == [common.LDM]
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert not any("_orig_mod" in k for k in ck["model"])
    assert not ck["dreambooth"]["prior"] and set(ck["dreambooth"]["last_losses"]) == {"inst"}
    assert not os.path.exists(os.path.join(out, "class_circle"))
    assert not torch.equal(ck["model"]["text.blocks.0.ff.0.weight"], before["text.blocks.0.ff.0.weight"])


def test_errors(base_ckpt, tmp_path):
    rc, log = run("--train", "--base", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x"))
    assert rc == 2 and "python ldm.py --train" in log and len(log.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="no images"):
        dreambooth.main(["--train", "--preset", "tiny", "--base", base_ckpt,
                         "--instance-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "y")])
    with pytest.raises(common.UserError, match="class-noun"):
        dreambooth.main(["--train", "--preset", "tiny", "--base", base_ckpt, "--class-noun", "dog",
                         "--out", str(tmp_path / "y")])
    with pytest.raises(common.UserError, match="base vocabulary"):
        dreambooth.main(["--train", "--preset", "tiny", "--base", base_ckpt, "--class-prompt", "a dog",
                         "--out", str(tmp_path / "y")])
    with pytest.raises(common.UserError, match="fine-tune one"):
        dreambooth.main(["--sample", "--out", str(tmp_path / "none")])


def test_eval_runs_on_tiny(base_ckpt, tmp_path, monkeypatch):
    # the judges are cached in ./out/judge
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "db")
    dreambooth.main(["--train", "--preset", "tiny", "--base", base_ckpt, "--out", out,
                     "--num-class-images", "2", "--max-steps", "1", "--steps", "2", "--n-samples", "1",
                     "--device", "cpu"])
    res = dreambooth.main(["--eval", "--preset", "tiny", "--out", out, "--n-samples", "3", "--steps", "2",
                           "--device", "cpu"])
    for k in ("subject_fidelity", "prompt_fidelity", "prompt_subject", "class_ordinary_finetuned",
              "class_ordinary_base", "class_diversity_finetuned", "class_diversity_base", "ordinary_fid"):
        assert k in res and res[k] == res[k], k
    assert 0 <= res["subject_fidelity"] <= 1 and 0 <= res["class_ordinary_base"] <= 1


def test_resume_continues_exactly_with_the_checkpoints_settings(base_ckpt, tmp_path, capsys):
    common_args = ["--train", "--preset", "tiny", "--base", base_ckpt, "--num-class-images", "2",
                   "--steps", "2", "--n-samples", "1", "--device", "cpu", "--identifier", "zqx",
                   "--seed", "2"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    dreambooth.main(common_args + ["--max-steps", "4", "--out", full])
    dreambooth.main(common_args + ["--max-steps", "2", "--out", part])
    assert torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)["step"] == 2
    # --resume takes the identifier (and every other setting) from the checkpoint, not from the defaults
    dreambooth.main(["--train", "--resume", "--max-steps", "4", "--out", part, "--steps", "2",
                     "--n-samples", "1"])
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 4 and b["dreambooth"]["identifier"] == "zqx" and b["seed"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert dreambooth.main(["--train", "--resume", "--out", part]) == (None, None)
    assert "already at step 4" in capsys.readouterr().out


def test_eval_of_a_subject_of_your_own(base_ckpt, tmp_path, monkeypatch):
    """--data photos: no ring judge; fidelity is the judge-feature cosine similarity to the instances (three
    identical instances: their mutual similarity is exactly 1) and the ceiling the autoencoder's PSNR."""
    from PIL import Image
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    im = Image.new("RGB", (16, 16), (30, 160, 60))
    im.paste((200, 200, 40), (4, 4, 10, 10))
    for i in range(3):
        im.save(photos / f"{i}.png")
    out = str(tmp_path / "db")
    dreambooth.main(["--train", "--preset", "tiny", "--base", base_ckpt, "--out", out, "--data", str(photos),
                     "--class-prompt", "a green square", "--no-prior", "--max-steps", "1", "--steps", "2",
                     "--n-samples", "1", "--device", "cpu"])
    res = dreambooth.main(["--eval", "--preset", "tiny", "--out", out, "--n-samples", "3", "--steps", "2",
                           "--device", "cpu"])
    assert "subject_fidelity" not in res and "subject_ceiling" not in res
    assert res["instance_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert -1 <= res["subject_similarity"] <= 1 and res["instance_recon_psnr"] > 0
    assert -1 <= res["class_similarity_base"] <= 1 and -1 <= res["class_similarity_finetuned"] <= 1
    assert 0 <= res["class_ordinary_finetuned"] <= 1
