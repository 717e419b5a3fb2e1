"""Build the small assets `hwprune quickstart` ships with (run from the repository root).

    python tools/make_quickstart_assets.py --checkpoint runs/baselines/cifar_resnet20.pt \
        --data ../shared/data/cifar10-jpg

Writes ``hwprune/assets/cifar_resnet20.pt`` (the baseline trained by `tools/train_baselines.sh`,
re-saved with its test accuracy in the metadata) and ``hwprune/assets/cifar10-sample/``
(``train.tar.gz``: the first N JPEGs of every class of the CIFAR-10 training tarball, for GCP
and fine-tuning; ``test.tar.gz``: the same from the test tarball, for evaluation). The JPEGs are
copied byte for byte (about 320 bytes each): the whole training set (5,000 per class, the default) is
16 MB. Deterministic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "hwprune" / "assets"


def subset_tarball(src: Path, dst: Path, per_class: int) -> None:
    """Copy the first ``per_class`` images (sorted by name) of every class folder of ``src`` to ``dst``."""
    import gzip
    import io
    import tarfile

    with tarfile.open(src) as tin:
        files = sorted((m for m in tin.getmembers() if m.isfile()), key=lambda m: m.name)
        by_class: dict[str, list] = {}
        for m in files:
            by_class.setdefault(str(Path(m.name).parent), []).append(m)
        tmp = dst.with_name(dst.name + ".tmp")
        # gzip's header holds a time stamp and a file name: with neither, the same images give the same bytes
        with open(tmp, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w") as tout:
            for cls in sorted(by_class):
                for m in by_class[cls][:per_class]:
                    info = tarfile.TarInfo(m.name)
                    data = tin.extractfile(m).read()
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tout.addfile(info, io.BytesIO(data))
        tmp.replace(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpg")
    ap.add_argument("--train-per-class", type=int, default=5000)
    ap.add_argument("--test-per-class", type=int, default=200)
    a = ap.parse_args()

    from hwprune.training.data import load_splits

    sample = ASSETS / "cifar10-sample"
    sample.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", a.train_per_class), ("test", a.test_per_class)):
        subset_tarball(a.data / f"{split}.tar.gz", sample / f"{split}.tar.gz", per_class)
    for f in sorted(sample.iterdir()):
        print(f"wrote {f.relative_to(ROOT)} ({f.stat().st_size / 1e6:.2f} MB)")
    if a.checkpoint is not None:
        from hwprune.training.checkpoint import Checkpoint
        from hwprune.training.train import evaluate

        ck = Checkpoint.load(a.checkpoint)
        if ck.arch != "cifar_resnet20" or ck.widths:
            raise SystemExit(f"{a.checkpoint} is not an unpruned cifar_resnet20 checkpoint")
        splits = load_splits(a.data)
        model = ck.build_model().module
        ck.meta["accuracy"] = evaluate(model, splits.test)
        ck.meta["provenance"] = f"tools/train_baselines.sh ({ck.meta.get('train', {}).get('epochs', '?')} epochs), " \
                                f"full CIFAR-10 test split"
        ck.meta.pop("history", None)
        out = ck.save(ASSETS / "cifar_resnet20.pt")
        print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size / 1e6:.2f} MB), top-1 {ck.meta['accuracy']['top1']}%")


if __name__ == "__main__":
    main()
