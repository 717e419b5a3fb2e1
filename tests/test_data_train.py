"""Data loading, augmentation, checkpoints, training/resume and the train/eval commands."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import hwprune.cli.train  # noqa: F401  (registers train/eval)
import hwprune.training.data as data_mod
import hwprune.training.train as train_mod
from hwprune.training.checkpoint import FORMAT, Checkpoint
from hwprune.cli import app
from hwprune.training.data import (CIFAR10_MEAN, BatchLoader, ImageDataset, channel_stats, holdout_split, load_dataset,
                          load_splits, save_npz_sample)
from hwprune.errors import HwpruneError
from hwprune.models import create_model
from hwprune.training.train import TrainConfig, evaluate, train

CLASSES = ["cat", "dog", "frog"]
COLORS = {"cat": (220, 40, 40), "dog": (40, 200, 60), "frog": (50, 60, 230)}


def _write_split(root: Path, split: str, per_class: int, rng: np.random.Generator, size=(32, 32)) -> None:
    for c in CLASSES:
        d = root / split / c
        d.mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-30, 30, size=(size[1], size[0], 3))
            img = np.clip(np.array(COLORS[c]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:04d}.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """ImageFolder splits: 3 colour-coded classes, 12 train and 4 test images each (32x32 PNG)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    _write_split(root, "train", 12, rng)
    _write_split(root, "test", 4, rng)
    return root


@pytest.fixture(scope="module")
def tarballs(folder, tmp_path_factory) -> Path:
    """The same splits as ``train.tar.gz`` / ``test.tar.gz``."""
    root = tmp_path_factory.mktemp("tars")
    for split in ("train", "test"):
        with tarfile.open(root / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(folder / split, arcname=split)
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HWPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "datasets"


# ----------------------------------------------------------------------------- data


def test_folder_and_tarball_decode_alike_and_cache(folder, tarballs, cache, monkeypatch):
    a = load_dataset(folder, "train")
    b = load_dataset(tarballs, "train")
    assert a.images.shape == (36, 32, 32, 3) and a.images.dtype == np.uint8
    assert a.labels.dtype == np.int64 and np.bincount(a.labels).tolist() == [12, 12, 12]
    assert a.classes == b.classes == CLASSES
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(list(cache.glob("*.npz"))) == 2

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data_mod, "_decode", no_decode)
    c = load_dataset(tarballs, "train")
    np.testing.assert_array_equal(a.images, c.images)


def test_splits_share_train_normalisation(folder):
    s = load_splits(folder)
    assert len(s.train) == 36 and len(s.test) == 12
    assert s.test.mean == s.train.mean == channel_stats(s.train.images)[0]
    assert s.train.mean != CIFAR10_MEAN  # computed, since these are not CIFAR-10's classes


def test_resize_and_size_errors(tmp_path):
    rng = np.random.default_rng(1)
    _write_split(tmp_path, "train", 2, rng, size=(48, 40))
    assert load_dataset(tmp_path, "train").images.shape == (6, 40, 48, 3)  # one size: kept as is
    ds = load_dataset(tmp_path, "train", image_size=32)
    assert ds.images.shape == (6, 32, 32, 3)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "train" / "cat" / "small.png")
    with pytest.raises(HwpruneError, match="different sizes"):
        load_dataset(tmp_path, "train")


def test_bad_paths(tmp_path, folder):
    with pytest.raises(HwpruneError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HwpruneError, match="no 'train' split"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(HwpruneError, match="cannot read tarball"):
        load_dataset(tmp_path / "bad.tar.gz")
    bare = load_splits(folder / "train")  # a bare ImageFolder: train only, nothing held out
    assert len(bare.train) == 36 and bare.test is None
    assert len(load_dataset(folder / "train", "test")) == 36  # but it serves any split when asked for one


def test_batches_normalised_and_augmentation_deterministic(folder):
    ds = load_dataset(folder, "train")
    plain = list(BatchLoader(ds, 10))
    assert [x.shape[0] for x, _ in plain] == [10, 10, 10, 6]
    x0 = plain[0][0]
    expected = (torch.from_numpy(ds.images[:10]).permute(0, 3, 1, 2).float() / 255
                - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x0, expected)

    def run(epoch):
        loader = BatchLoader(ds, 8, shuffle=True, augment=True, seed=3, drop_last=True, channels_last=True)
        loader.set_epoch(epoch)
        return list(loader)

    a, b, c = run(0), run(0), run(1)
    assert len(a) == 4 and a[0][0].shape == (8, 3, 32, 32)
    assert a[0][0].is_contiguous(memory_format=torch.channels_last)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_augmentation_is_a_padded_crop_or_its_mirror():
    rng = np.random.default_rng(2)
    ds = ImageDataset(images=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8), labels=np.arange(16) % 2,
                      classes=["a", "b"], mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    loader = BatchLoader(ds, 16, augment=True, pad=2)
    (x, _), = list(loader)
    padded = torch.nn.functional.pad(torch.from_numpy(ds.images).permute(0, 3, 1, 2).float(), (2, 2, 2, 2))
    for i in range(16):
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        crops += [c.flip(2) for c in crops]
        assert any(torch.equal(x[i].round(), c) for c in crops)


def test_holdout_split_deterministic_and_disjoint(folder):
    ds = load_dataset(folder, "train")
    ds = ds.subset(np.arange(len(ds)))
    ds.images = ds.images.copy()
    ds.images[:, 0, 0, 0] = np.arange(len(ds))  # tag each image with its index
    rest, held = holdout_split(ds, per_class=3, seed=7)
    rest2, held2 = holdout_split(ds, per_class=3, seed=7)
    np.testing.assert_array_equal(held.images, held2.images)
    np.testing.assert_array_equal(rest.labels, rest2.labels)
    assert np.bincount(held.labels).tolist() == [3, 3, 3] and len(rest) == 27
    ids_rest, ids_held = set(rest.images[:, 0, 0, 0]), set(held.images[:, 0, 0, 0])
    assert not ids_rest & ids_held and len(ids_rest | ids_held) == 36
    _, other = holdout_split(ds, per_class=3, seed=8)
    assert set(other.images[:, 0, 0, 0]) != ids_held
    with pytest.raises(HwpruneError):
        holdout_split(ds, per_class=13)


def test_npz_sample_roundtrip(folder, tmp_path):
    splits = load_splits(folder)
    save_npz_sample(splits.train, tmp_path / "mini" / "train.npz", per_class=5)
    save_npz_sample(splits.test, tmp_path / "mini" / "test.npz", per_class=2)
    mini = load_splits(tmp_path / "mini")
    assert mini.train.images.shape == (15, 32, 32, 3) and np.bincount(mini.test.labels).tolist() == [2, 2, 2]
    assert mini.train.mean == pytest.approx(splits.train.mean) and mini.train.classes == CLASSES
    single = load_dataset(tmp_path / "mini" / "train.npz", "test")  # a file serves every split
    np.testing.assert_array_equal(single.images, mini.train.images)


# ----------------------------------------------------------------------------- checkpoints


def _resnet20(num_classes=3):
    torch.manual_seed(0)
    return create_model("cifar_resnet20", num_classes=num_classes)


def test_checkpoint_roundtrip_weights_only(tmp_path):
    spec = _resnet20()
    ck = Checkpoint.from_model(spec, meta={"note": "x", "vals": (1, 2)})
    path = ck.save(tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["arch"] == "cifar_resnet20" and raw["input_size"] == [3, 32, 32]
    assert raw["meta"] == {"note": "x", "vals": [1, 2]} and raw["widths"] is None
    back = Checkpoint.load(path)
    rebuilt = back.build_model()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.module(x), spec.module.eval()(x))
    assert rebuilt.num_classes == 3 and not list(tmp_path.glob("*.tmp"))


def test_checkpoint_errors(tmp_path):
    path = Checkpoint.from_model(_resnet20()).save(tmp_path / "m.pt")
    blob = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(HwpruneError, match="cannot read checkpoint"):
        Checkpoint.load(tmp_path / "cut.pt")
    with pytest.raises(HwpruneError, match="does not exist"):
        Checkpoint.load(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(HwpruneError, match="not an hwprune checkpoint"):
        Checkpoint.load(tmp_path / "foreign.pt")
    torch.save({"format": FORMAT, "module": torch.nn.Linear(1, 1)}, tmp_path / "pickled.pt")
    with pytest.raises(HwpruneError, match="other than tensors"):
        Checkpoint.load(tmp_path / "pickled.pt")
    wrong = Checkpoint.load(path)
    wrong.arch = "cifar_resnet32"
    with pytest.raises(HwpruneError, match="do not fit cifar_resnet32"):
        wrong.build_model()


# ----------------------------------------------------------------------------- training


FAST = dict(batch_size=8, lr=0.05, warmup_epochs=0.0, precision="fp32", threads=1, eval_every=2, seed=1)


def test_train_writes_checkpoint_state_log_and_learns(folder, tmp_path):
    splits = load_splits(folder)
    out = tmp_path / "run" / "r20.pt"
    result = train(_resnet20(), splits, TrainConfig(epochs=4, **FAST), out, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "r20.log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[0]["test_top1"] is not None and log[2]["test_top1"] is None
    assert result.top1 == log[-1]["test_top1"] and result.state_path == tmp_path / "run" / "r20.state.pt"
    state = torch.load(result.state_path, weights_only=True)
    assert state["epoch"] == 4
    ck = Checkpoint.load(out)
    assert ck.meta["top1"] == result.top1 and ck.meta["data"]["classes"] == CLASSES
    assert ck.meta["train"]["epochs"] == 4
    assert evaluate(ck.build_model().module, splits.test)["top1"] == result.top1


def test_resume_after_interruption_matches_uninterrupted_run(folder, tmp_path, monkeypatch):
    splits = load_splits(folder)
    cfg = TrainConfig(epochs=3, **FAST)
    straight = train(_resnet20(), splits, cfg, tmp_path / "a.pt", progress=False)

    real_evaluate, calls = train_mod.evaluate, []

    def interrupt_on_second_eval(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", interrupt_on_second_eval)
    with pytest.raises(KeyboardInterrupt):  # dies during epoch 2: the state holds epoch 1
        train(_resnet20(), splits, cfg, tmp_path / "b.pt", progress=False)
    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    assert torch.load(tmp_path / "b.state.pt", weights_only=True)["epoch"] == 1
    resumed = train(_resnet20(), splits, cfg, tmp_path / "b.pt", progress=False)
    assert [json.loads(x)["epoch"] for x in (tmp_path / "b.log.jsonl").read_text().splitlines()] == [1, 2, 3]
    a, b = Checkpoint.load(straight.checkpoint).state_dict, Checkpoint.load(resumed.checkpoint).state_dict
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)

    with pytest.raises(HwpruneError, match="another model"):
        train(create_model("cifar_resnet32", num_classes=3), splits, cfg, tmp_path / "b.pt", progress=False)


def test_finetune_checkpoint_with_teacher(folder, tmp_path):
    splits = load_splits(folder)
    teacher = Checkpoint.from_model(_resnet20(), meta={"train": {"epochs": 9}}).save(tmp_path / "t.pt")
    cfg = TrainConfig(epochs=1, teacher=str(teacher), **FAST)
    result = train(Checkpoint.load(teacher), splits, cfg, tmp_path / "s.pt", progress=False)
    meta = Checkpoint.load(result.checkpoint).meta
    assert meta["history"] == [{"epochs": 9}] and meta["train"]["teacher"] == str(teacher)


def test_train_rejects_mismatched_data(folder, tmp_path):
    with pytest.raises(HwpruneError, match="outputs but the data has 3 classes"):
        train(_resnet20(num_classes=10), load_splits(folder), TrainConfig(epochs=1, **FAST), tmp_path / "x.pt")
    with pytest.raises(HwpruneError, match="unknown schedule"):
        train(_resnet20(), load_splits(folder), TrainConfig(epochs=1, schedule="step"), tmp_path / "x.pt")


def test_lr_schedules():
    peak, total = 0.2, 100
    cos = [train_mod._lr_at(s, total, 10, peak, "cosine") for s in range(total)]
    assert cos[9] == pytest.approx(peak) and cos[0] == pytest.approx(peak / 10) and cos[-1] < 1e-3
    one = [train_mod._lr_at(s, total, 0, peak, "onecycle") for s in range(total)]
    assert one[0] == pytest.approx(peak / 25) and max(one) == pytest.approx(peak) and one[-1] < peak / 100


# ----------------------------------------------------------------------------- CLI


def test_cli_train_then_eval_json(tarballs, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.pt"
    r = runner.invoke(app, ["train", "--model", "cifar_resnet20", "--data", str(tarballs), "--epochs", "1",
                            "--out", str(out), "--batch-size", "12", "--precision", "fp32", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    r = runner.invoke(app, ["eval", "--checkpoint", str(out), "--data", str(tarballs), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n"] == 12 and result["top1"] == summary["top1"] and set(result) == {"top1", "top5", "n"}


def test_cli_errors(tarballs, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tarballs)])
    assert isinstance(r.exception, HwpruneError) and "does not exist" in r.exception.message
    r = runner.invoke(app, ["train", "--data", str(tarballs), "--out", str(tmp_path / "x.pt")])
    assert isinstance(r.exception, HwpruneError) and "--model" in r.exception.message
