"""Data as users bring it: a folder of 28x28 PNG digits, one subfolder per class (as MNIST or CIFAR-10 come
as images), through every conditional script with no code change: held-out part kept apart, small images
upscaled, shape errors before any training, grids spread over the classes."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import ddpm
import guided
import ldm


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """3 classes x 10 grayscale 28x28 PNGs: a bar whose angle is the class, at jittered places."""
    root = tmp_path_factory.mktemp("digits")
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(root / str(c))
        for k in range(10):
            a = np.zeros((28, 28), np.uint8)
            o = rng.integers(-3, 4, 2)
            if c == 0:
                a[6 + o[0]:22 + o[0], 12 + o[1]:16 + o[1]] = 255        # vertical
            elif c == 1:
                a[12 + o[0]:16 + o[0], 6 + o[1]:22 + o[1]] = 255        # horizontal
            else:
                for i in range(16):
                    a[6 + i + o[0], 6 + i + o[1]:9 + i + o[1]] = 255    # diagonal
            Image.fromarray(a).save(root / str(c) / f"{k}.png")
    return str(root)


def test_small_digits_train_at_32_with_a_held_out_part(digits, tmp_path, capsys):
    out = str(tmp_path / "ddpm")
    ddpm.main(["--train", "--data", digits, "--channels", "1", "--image-size", "32",          # the cpu preset
               "--batch-size", "4", "--max-steps", "2", "--steps", "2", "--n-samples", "2", "--out", out])
    assert "upscaled 30 of 30 images" in capsys.readouterr().err               # said once, for all of them
    train, held = (common.load_data(digits, 32, 1, train=t) for t in (True, False))
    # 20% of each class, never trained on
    assert len(train) == 24 and held.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]["image_size"] == 32


def test_shape_errors_come_before_any_training(digits, tmp_path):
    for script, flags, msg in [
        (ldm, ["--cond", "class", "--image-size", "28"], "U-Net \\(7px\\) must be divisible by 2"),
        (guided, ["--image-size", "28"], "attention at 16px never occurs"),
        (ddpm, ["--image-size", "28"], "attention at 8px never occurs"),
        (ldm, ["--cond", "class", "--preset", "tiny", "--batch-size", "64"],
         "more than the 24 training images"),
    ]:
        out = tmp_path / script.__name__
        with pytest.raises(common.UserError, match=msg):
            script.main(["--train", "--data", digits, "--channels", "1", *flags, "--out", str(out)])
        assert not (out / "ae.pt").exists() and not (out / "ckpt.pt").exists()


def test_conditional_scripts_on_a_labelled_folder(digits, tmp_path, monkeypatch, capsys):
    # the judge is cached in ./out/judge
    monkeypatch.chdir(tmp_path)
    base = ["--preset", "tiny", "--data", digits, "--channels", "1", "--batch-size", "4", "--steps", "2"]
    run = str(tmp_path / "ldm")
    ldm.main(["--train", "--cond", "class", *base, "--max-steps", "2", "--ae-steps", "2", "--n-samples", "6",
              "--out", run])
    # the training grid: one row per class (2 each), whatever order the folder sorts in
    assert open(os.path.join(run, "samples.txt")).read().split() == ["0", "0", "1", "1", "2", "2"]
    assert Image.open(os.path.join(run, "samples.png")).size == (2 * 18 + 2, 3 * 18 + 2)
    ldm.main(["--sample", "--class", "2", "--n-samples", "2", "--steps", "2", "--out", run])
    res = ldm.main(["--eval", *base, "--n-samples", "4", "--out", run])
    assert res["cond"] == "class" and 0 <= res["acc"] <= 1 and 0 <= res["confident"] <= 1
    gout = str(tmp_path / "guided")
    guided.main(["--train", *base, "--max-steps", "2", "--clf-steps", "2", "--n-samples", "3", "--out", gout])
    clf = torch.load(os.path.join(gout, "classifier.pt"), weights_only=True)
    assert clf["config"]["num_classes"] == 3 and clf["accuracy"]["n"] == 6   # measured on the held-out part
    res = guided.main(["--eval", *base, "--n-samples", "4", "--scale", "1", "--out", gout])
    assert 0 <= res["acc"] <= 1 and res["judge_acc"] is not None
    judge = torch.load(common.judge_path(digits, 16, 1, steps=30), weights_only=True)
    # the judge, too, tests on held-out data
    assert judge["n_train"] == 24 and judge["n_test"] == 6
