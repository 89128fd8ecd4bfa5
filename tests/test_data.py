"""Data loaders on small files the tests make, including the bad cases."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import common


def test_shapes_are_deterministic_labelled_and_captioned():
    d = common.ShapesData(32, seed=5)
    x, y, cap = d[7]
    x2, y2, cap2 = common.ShapesData(32, seed=5)[7]
    assert torch.equal(x, x2) and y == y2 and cap == cap2
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    a = d.attributes(7)
    assert cap == common.shape_caption(a) and common.SHAPES[y] == a["shape"]
    assert cap.startswith(f"a {a['size']} {a['color']} {a['shape']}")
    assert not torch.equal(x, d[8][0]) and not torch.equal(x, common.ShapesData(32, seed=6)[7][0])
    assert common.ShapesData(48, channels=1)[0][0].shape == (1, 48, 48)


def test_shapes_cover_every_attribute_and_color_is_where_the_caption_says():
    d = common.ShapesData(32, seed=0)
    seen = {k: set() for k in ("shape", "color", "size", "position")}
    for i in range(400):
        a = d.attributes(i)
        for k in seen:
            seen[k].add(a[k])
    assert seen == {"shape": set(common.SHAPES), "color": set(common.COLORS), "size": set(common.SIZES),
                    "position": set(common.POSITIONS)}
    # the brightest-colored third of the image is where the caption's position says
    for i in range(20):
        a, x = d.attributes(i), d[i][0]
        energy = (x + 1).sum(dim=(0, 1))  # (W,)
        thirds = [energy[:11].sum(), energy[11:21].sum(), energy[21:].sum()]
        assert common.POSITIONS[int(np.argmax(thirds))] == a["position"]
        color = torch.tensor(common.COLORS[a["color"]], dtype=torch.float32) / 127.5 - 1
        center_px = x[:, 16, int(32 * {"left": 0.25, "center": 0.5, "right": 0.75}[a["position"]])]
        if a["size"] == "large" and a["shape"] != "triangle":
            assert torch.allclose(center_px, color, atol=0.1)


def save_img(path, size=(40, 36), mode="RGB", color=(200, 10, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color if mode != "L" else 128).save(path)


def test_folder_with_classes_captions_modes_and_unreadable_files(tmp_path, capsys):
    save_img(str(tmp_path / "cats" / "a.png"))
    save_img(str(tmp_path / "cats" / "deep" / "b.jpg"), mode="RGB")
    save_img(str(tmp_path / "dogs" / "c.webp"), mode="RGBA", color=(0, 0, 255, 128))
    save_img(str(tmp_path / "dogs" / "d.bmp"), mode="L")
    (tmp_path / "dogs" / "d.txt").write_text("a gray dog\n")
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not an image")
    d = common.load_folder(str(tmp_path), image_size=32, channels=3)
    assert len(d) == 4 and d.class_names == ["cats", "dogs"] and d.num_classes == 2
    assert "skipped 1 unreadable" in capsys.readouterr().err
    # --data holds one image of each class out (held_out_split), and trains on the others
    train, held = (common.load_data(str(tmp_path), 32, 3, train=t) for t in (True, False))
    assert len(train) == len(held) == 2 and sorted(held.labels.tolist()) == [0, 1]
    xs = [d[i] for i in range(4)]
    assert all(x.shape == (3, 32, 32) for x, _, _ in xs)
    assert [y for _, y, _ in xs] == [0, 0, 0, 1] or sorted(y for _, y, _ in xs) == [0, 0, 1, 1]
    caps = {c for _, _, c in xs}
    assert "a gray dog" in caps and "cats" in caps
    red = [x for x, y, c in xs if c == "cats"][0]
    assert red[0].mean() > 0.5 and red[1].mean() < -0.8  # red stays red after resize/crop
    g = common.load_folder(str(tmp_path), image_size=16, channels=1)
    assert g[0][0].shape == (1, 16, 16)


def test_folder_errors(tmp_path):
    with pytest.raises(common.UserError, match="no such file"):
        common.load_data(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="no images found"):
        common.load_data(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    with pytest.raises(common.UserError, match="could be read"):
        common.load_data(str(tmp_path / "bad"))
    save_img(str(tmp_path / "tiny" / "s.png"), size=(7, 30))
    with pytest.raises(common.UserError, match="s.png is 7x30, below 8 pixels"):
        common.load_data(str(tmp_path / "tiny"), image_size=32)
    save_img(str(tmp_path / "one" / "s.png"))
    with pytest.raises(common.UserError, match="one image is not a dataset"):
        common.load_data(str(tmp_path / "one"), image_size=32)


def test_small_images_are_upscaled_and_said_once(tmp_path, capsys):
    for k in range(3):
        img = Image.new("L", (28, 28), 0)
        img.paste(255, (10, 10, 18, 18))                            # a white square in the middle
        os.makedirs(tmp_path / str(k), exist_ok=True)
        img.save(tmp_path / str(k) / "a.png")
        img.save(tmp_path / str(k) / "b.png")
    d = common.load_folder(str(tmp_path), image_size=32, channels=1)
    err = capsys.readouterr().err
    assert err.count("upscaled 6 of 6 images") == 1 and "the smallest is 28x28" in err
    x = d[0][0]
    # the square stays in the middle
    assert x.shape == (1, 32, 32) and x[0, 16, 16] > 0.9 and x[0, 1, 1] < -0.9
    ones = (x[0] > 0).sum().item()
    assert 64 * (32 / 28) ** 2 * 0.8 < ones < 64 * (32 / 28) ** 2 * 1.2       # and grows by 32/28 per side


def write_cifar(folder, n=12):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(i % 10) for i in range(n)]
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"training batch 1 of 5"}, f)
    return data, labels


def test_cifar10_python_format(tmp_path):
    data, labels = write_cifar(tmp_path / "cifar-10-batches-py")
    d = common.load_cifar10(str(tmp_path / "cifar-10-batches-py"), 32, 3, ["data_batch_1"])
    assert len(d) == 12 and d.class_names[3] == "cat"
    x, y, cap = d[5]
    assert y == labels[5] and cap == common.CIFAR_CLASSES[labels[5]]
    # row-major R plane, then G, then B: pixel (row 2, col 7) of channel 1
    assert x[1, 2, 7].item() == pytest.approx(data[5, 1024 + 2 * 32 + 7] / 127.5 - 1, abs=1e-6)
    # the parent folder works too; without test_batch, one image of each class with two is held out
    train, held = (common.load_data(str(tmp_path), 32, train=t) for t in (True, False))
    assert len(train) == 10 and sorted(held.labels.tolist()) == [0, 1]
    # with test_batch, that is the held-out part and every training batch is trained on
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": data[:3], b"labels": labels[:3]}, f)
    train, held = (common.load_data(str(tmp_path), 32, train=t) for t in (True, False))
    assert len(train) == 12 and len(held) == 3


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(common.UserError, match="not a CIFAR-10 python batch"):
        common.load_data(str(folder))


def write_idx(path, arr, gz):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    (gzip.open if gz else open)(path, "wb").write(header + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    ext = ".gz" if gz else ""
    imgs = np.zeros((5, 28, 28), np.uint8)
    imgs[:, 10:18, 10:18] = 255
    write_idx(str(tmp_path / f"t10k-images-idx3-ubyte{ext}"), imgs, gz)
    write_idx(str(tmp_path / f"t10k-labels-idx1-ubyte{ext}"), np.arange(5), gz)
    d = common.load_mnist(str(tmp_path), image_size=28, channels=1, prefix="t10k")
    assert len(d) == 5 and d[3][1] == 3 and d[3][0].shape == (1, 28, 28)
    assert d[0][0][0, 14, 14] == 1 and d[0][0][0, 0, 0] == -1
    assert common.load_data(str(tmp_path), image_size=32, channels=3)[0][0].shape == (3, 32, 32)
    # one class per image: nothing to hold out of a class of one, so all five train and none is held out
    assert len(common.load_data(str(tmp_path), 28, 1)) == 5
    assert len(common.load_data(str(tmp_path), 28, 1, train=False)) == 0


def test_mnist_truncated_is_a_user_error(tmp_path):
    write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), np.zeros((5, 28, 28)), False)
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.arange(5), False)
    raw = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:-100])
    with pytest.raises(common.UserError, match="truncated"):
        common.load_data(str(tmp_path), image_size=28, channels=1)


def test_batches_resume_and_shard():
    d = common.ShapesData(8)
    it = common.batches(d, 4, seed=0)
    seq = [next(it)[0] for _ in range(5)]
    resumed = common.batches(d, 4, seed=0, step=3)
    assert torch.equal(next(resumed)[0], seq[3])
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2).contiguous()
    t = common.TensorData(images,
                          torch.zeros(20, dtype=torch.long), None)
    r0 = next(common.batches(t, 5, seed=1, rank=0, world=2))[0]
    r1 = next(common.batches(t, 5, seed=1, rank=1, world=2))[0]
    v0, v1 = set(r0[:, 0, 0, 0].tolist()), set(r1[:, 0, 0, 0].tolist())
    assert len(v0) == 5 and len(v1) == 5 and not v0 & v1  # ranks see disjoint shards
    a = common.batches(t, 5, seed=1, flip=True)
    b = common.batches(t, 5, seed=1, step=0, flip=True)
    assert torch.equal(next(a)[0], next(b)[0])


def test_real_mnist_from_shared_folder_when_present():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")
    if not os.path.isdir(root):
        pytest.skip("../shared/data/mnist is not here")
    d, held = (common.load_data(root, image_size=32, channels=1, train=t) for t in (True, False))
    assert len(d) + len(held) == 10_000 and 1990 <= len(held) <= 2000 and d.num_classes == 10  # t10k only
    every = torch.cat([d.labels, held.labels])
    assert held.labels.bincount().tolist() == [int(c * 0.2) for c in every.bincount()]
    assert not set(map(bytes, held.images.flatten(1).numpy())) & set(map(bytes, d.images.flatten(1).numpy()))
    x, y, cap = d[0]
    assert x.shape == (1, 32, 32) and 0 <= y < 10 and cap == str(y)
    assert x.min() == pytest.approx(-1, abs=0.01) and x.max() > 0.9  # white digit on black


def test_held_out_split_is_stratified_capped_and_fixed():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20 + [3])
    train, held = common.held_out_split(labels)
    assert sorted(train + held) == list(range(101)) and not set(train) & set(held)
    # 20% of each class; a class of one trains
    assert labels[held].bincount().tolist() == [10, 6, 4]
    assert common.held_out_split(labels) == (train, held)                # the same images every run
    big = torch.arange(30_000) % 3
    train, held = common.held_out_split(big)
    assert len(held) == 1998 and big[held].bincount().tolist() == [666] * 3   # at most 2000 in all


def test_a_batch_larger_than_the_data_is_refused_before_training(tmp_path):
    for k in range(2):
        save_img(str(tmp_path / str(k) / "a.png"))
        save_img(str(tmp_path / str(k) / "b.png"))
    import ddpm
    with pytest.raises(common.UserError, match="--batch-size 8 is more than the 2 training images; use"):
        ddpm.main(["--train", "--preset", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_grid_items_spread_over_the_classes_one_row_each():
    # sorted, as a folder of class subfolders
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 5)
    t = common.TensorData(torch.zeros(17, 1, 8, 8, dtype=torch.uint8), labels, ["a", "b", "c"])
    items, per = common.grid_items(t, 7)
    assert per == 3 and [y for _, y, _ in items] == [0, 0, 0, 1, 1, 1, 2, 2, 2]   # class b repeats its two
    items, per = common.grid_items(common.ShapesData(16, seed=3), 8)
    assert per == 2 and [y for _, y, _ in items] == [0, 0, 1, 1, 2, 2, 3, 3]
    loose = common.TensorData(torch.zeros(5, 1, 8, 8, dtype=torch.uint8), torch.zeros(5, dtype=torch.long),
                              None)
    items, per = common.grid_items(loose, 7)                             # no classes: the first n, wrapping
    assert per is None and len(items) == 7
