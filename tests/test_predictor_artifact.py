"""A fitted predictor saved as an artifact, loaded without refitting, refused when it does not fit.

Fast: the table is 12 configurations of the shipped cifar_resnet20 table, and the
predictors use one regressor and the measured calibration (no cross-validation)."""

import hashlib
import io
import json
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from conftest import run_cli
from hwprune.prediction import artifact
from hwprune.errors import HwpruneError
from hwprune.prediction.predictor import FEATURE_VERSION, LatencyPredictor
from hwprune.profiling.table import LatencyTable

SHIPPED = Path(__file__).resolve().parents[1] / "latency_tables" / "onnxruntime-cpu-t2-b1" / "cifar_resnet20.parquet"
MODEL = "cifar_resnet20"
QUICK = {"regressor": "hgb", "calibration": "measured"}


def small_table(path: Path, first: int = 0, n: int = 12) -> Path:
    t = LatencyTable.load(SHIPPED)
    items = sorted(set(t.e2e["item"]))[first:first + n]
    return LatencyTable(t.rows[t.rows["item"].isin(items)], t.meta).save(path)


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    return small_table(tmp_path_factory.mktemp("artifact") / "r20.parquet")


@pytest.fixture(scope="module", params=["hgb", "extra_trees"])
def fitted(request, table_path):
    return LatencyPredictor(regressor=request.param, calibration="measured").fit(LatencyTable.load(table_path))


@pytest.fixture(scope="module")
def configs(fitted):
    space = fitted.check_model(MODEL).template.space
    rng = random.Random(0)
    return [space.sample(rng) for _ in range(40)] + [space.full(), space.uniform(0.25)]


@pytest.fixture
def saved(fitted, table_path, tmp_path):
    return artifact.save_predictor(fitted, tmp_path / "p.predictor.zip", table_path)


def refused(path, table_path=None) -> str:
    with pytest.raises(HwpruneError) as e:
        artifact.load_predictor(path, table_path)
    assert "\n" not in str(e.value)
    return str(e.value)


def rewrite(src: Path, dst: Path, header=None, payload=None) -> Path:
    """A copy of the artifact at ``src`` with its header or payload replaced."""
    with zipfile.ZipFile(src) as z:
        h, p = json.loads(z.read(artifact.HEADER)), z.read(artifact.PAYLOAD)
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr(artifact.HEADER, json.dumps(header(h) if header else h))
        z.writestr(artifact.PAYLOAD, payload if payload is not None else p)
    return dst


def test_loaded_predictor_predicts_bit_identically_without_refitting(fitted, saved, table_path, configs,
                                                                     monkeypatch):
    def no_fit(self, table):
        raise AssertionError("loading refitted the predictor")

    monkeypatch.setattr(LatencyPredictor, "fit", no_fit)
    back = LatencyPredictor.load(saved, table_path)
    assert np.array_equal(back.predict(MODEL, configs), fitted.predict(MODEL, configs))
    assert back.predict_layers(MODEL, configs[0]) == fitted.predict_layers(MODEL, configs[0])
    assert back.marginal_costs(MODEL, configs[1]) == fitted.marginal_costs(MODEL, configs[1])
    assert back.get_params() == fitted.get_params() and back.selection_ == fitted.selection_
    assert back.check_model(MODEL).template.space.model is None  # no torch module is saved
    assert fitted.check_model(MODEL).template.space.model is not None  # and the fitted one keeps its own


def test_header_records_table_hash_feature_version_and_versions(saved, table_path):
    with zipfile.ZipFile(saved) as z:
        assert sorted(z.namelist()) == sorted([artifact.HEADER, artifact.PAYLOAD])
        header = json.loads(z.read(artifact.HEADER))
        payload = z.read(artifact.PAYLOAD)
    assert header["format"] == artifact.FORMAT and header["feature_version"] == FEATURE_VERSION
    assert header["table"]["sha256"] == hashlib.sha256(table_path.read_bytes()).hexdigest()
    assert header["versions"] == artifact.library_versions()
    assert set(header["versions"]) == {"hwprune", "scikit-learn", "skops", "numpy"}
    # the payload is skops data: it loads with the fixed trusted list and holds no pickle
    with zipfile.ZipFile(io.BytesIO(payload)) as z:
        assert "schema.json" in z.namelist() and not any(n.endswith((".pkl", ".pickle")) for n in z.namelist())
    assert set(sio.get_untrusted_types(data=payload)) <= artifact.TRUSTED


def test_stale_foreign_and_damaged_artifacts_are_refused(saved, table_path, tmp_path):
    other = small_table(tmp_path / "other.parquet", first=12)
    assert "another table" in refused(saved, other)
    assert "feature version" in refused(rewrite(saved, tmp_path / "fv.zip", header=lambda h: {
        **h, "feature_version": FEATURE_VERSION + 1}), table_path)
    assert "scikit-learn 0.1" in refused(rewrite(saved, tmp_path / "v.zip", header=lambda h: {
        **h, "versions": {**h["versions"], "scikit-learn": "0.1"}}), table_path)
    assert "not an hwprune predictor" in refused(rewrite(saved, tmp_path / "fmt.zip", header=lambda h: {
        **h, "format": "something/1"}))
    blob = saved.read_bytes()
    (tmp_path / "cut.zip").write_bytes(blob[: len(blob) // 2])
    assert "truncated" in refused(tmp_path / "cut.zip", table_path)
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    assert "truncated, corrupt or not an hwprune predictor" in refused(tmp_path / "junk.zip")
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as z:
        z.writestr("a.txt", "hello")
    assert "not an hwprune predictor" in refused(tmp_path / "plain.zip")
    assert "does not exist" in refused(tmp_path / "missing.zip")


class Foreign:
    """A type no artifact holds."""


def test_untrusted_types_and_bad_tree_links_are_refused(saved, table_path, tmp_path):
    payload = sio.dumps({"predictor": Foreign(), "trees": {}})
    assert "holds types no hwprune predictor holds" in refused(
        rewrite(saved, tmp_path / "foreign.zip", payload=payload), table_path)
    with zipfile.ZipFile(saved) as z:
        good = sio.loads(z.read(artifact.PAYLOAD), trusted=sorted(artifact.TRUSTED))
    packed = good["trees"]["kernel/conv"]
    links = "left" if packed["kind"] == "boosting" else "left_child"
    packed["nodes"][links][0] = 10 ** 6  # the first tree's root points outside the tree
    msg = refused(rewrite(saved, tmp_path / "links.zip", payload=sio.dumps(good)), table_path)
    assert "node links are out of bounds" in msg


def test_cache_beside_the_table_fits_once_and_refits_when_stale(tmp_path, monkeypatch):
    table_path = small_table(tmp_path / "t.parquet")
    fits = []
    real_fit = LatencyPredictor.fit
    monkeypatch.setattr(LatencyPredictor, "fit", lambda self, t: fits.append(1) or real_fit(self, t))
    first = artifact.predictor_for(table_path, params=QUICK)
    cache = artifact.cache_path(table_path)
    assert cache == tmp_path / "t.predictor.zip" and cache.is_file() and len(fits) == 1
    second = artifact.predictor_for(table_path, params=QUICK)
    assert len(fits) == 1  # loaded from the cache, not fitted again
    cfgs = [first.check_model(MODEL).template.space.uniform(0.5)]
    assert np.array_equal(second.predict(MODEL, cfgs), first.predict(MODEL, cfgs))
    artifact.predictor_for(table_path, params={**QUICK, "min_rows": 5})  # other parameters: refitted
    assert len(fits) == 2
    small_table(table_path, first=12)  # the table changes: the stale cache is refitted and replaced
    artifact.predictor_for(table_path, params=QUICK)
    assert len(fits) == 3
    assert json.loads(zipfile.ZipFile(cache).read(artifact.HEADER))["table"]["sha256"] == \
        artifact.table_digest(table_path)
    cache.write_bytes(b"damaged")  # a damaged cache is refitted too
    artifact.predictor_for(table_path, params=QUICK)
    assert len(fits) == 4 and artifact.predictor_for(table_path, params=QUICK) is not None and len(fits) == 4
    with pytest.raises(HwpruneError, match="--predictor goes with --table"):
        artifact.predictor_for(None, cache)
    assert artifact.predictor_for(None) is None


def test_explicit_predictor_of_another_table_is_an_error(saved, tmp_path):
    other = small_table(tmp_path / "other.parquet", first=12)
    with pytest.raises(HwpruneError, match="another table"):
        artifact.predictor_for(other, saved)
    assert not artifact.cache_path(other).exists()  # nothing was fitted or cached instead


def test_scikit_learn_conventions(fitted, table_path):
    assert "get_params" not in vars(LatencyPredictor) and "set_params" not in vars(LatencyPredictor)
    assert clone(fitted).get_params() == fitted.get_params()
    with pytest.raises(NotFittedError):
        check_is_fitted(LatencyPredictor(), "models_")
    check_is_fitted(fitted, "models_")
    with pytest.raises(HwpruneError, match="not fitted"):
        LatencyPredictor().check_model(MODEL)
    with pytest.raises(HwpruneError, match="never covered model 'resnet18'"):
        fitted.check_model("resnet18")
    for bad, match in (({"cv_folds": 1}, "cv_folds"), ({"regressor": "svm"}, "unknown regressor"),
                       ({"calibration": "x"}, "unknown calibration"), ({"min_rows": 0}, "min_rows")):
        with pytest.raises(HwpruneError, match=match):
            LatencyPredictor(**bad).fit(LatencyTable.load(table_path))
    with pytest.raises(HwpruneError, match="LatencyTable"):
        LatencyPredictor().fit(str(table_path))


def test_cli_fit_then_predict_with_the_artifact(table_path, tmp_path):
    out = tmp_path / "r20.predictor.zip"
    r = run_cli("fit", "--table", str(table_path), "--out", str(out), "--regressor", "hgb", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["predictor"] == str(out) and doc["table_sha256"] == artifact.table_digest(table_path)
    loaded = artifact.load_predictor(out, table_path)
    r = run_cli("predict", "--table", str(table_path), "--model", MODEL, "--predictor", str(out), "--json")
    assert r.returncode == 0, r.stderr
    full = loaded.check_model(MODEL).template.space.full()
    assert json.loads(r.stdout)["predicted_ms"] == float(loaded.predict(MODEL, [full])[0])
    assert not artifact.cache_path(table_path).exists()  # an explicit predictor leaves the cache alone
    other = small_table(tmp_path / "other.parquet", first=12)
    r = run_cli("predict", "--table", str(other), "--model", MODEL, "--predictor", str(out))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "another table" in lines[0] and "Traceback" not in r.stderr


def test_each_distinct_layer_row_is_predicted_once_with_the_same_result(fitted, configs, monkeypatch):
    """Repeated configurations share their rows: they are predicted once, and every configuration
    gets exactly what it gets when predicted alone (one thread, so that sums are ordered)."""
    import hwprune.prediction.predictor as hp

    F = np.repeat(np.arange(12.0).reshape(4, 3), 3, axis=0)
    F = np.hstack([F, np.zeros((len(F), len(hp.FEATURE_NAMES) - 3))])
    U, inverse = hp.unique_rows(F)
    assert len(U) == 4 and np.array_equal(U[inverse], F)
    F[0, 0] = np.nan  # not comparable: every row is kept
    U, inverse = hp.unique_rows(F)
    assert len(U) == len(F)

    seen = []
    real = hp._kernel_ms
    monkeypatch.setattr(hp, "_kernel_ms", lambda est, X, a: (seen.append(len(X)), real(est, X, a))[1])
    many = configs * 5
    together = fitted.predict(MODEL, many)
    alone = np.concatenate([fitted.predict(MODEL, [c]) for c in configs])
    assert np.array_equal(together, np.tile(alone, 5))
    layers = len(fitted.check_model(MODEL).template.slots)
    kinds = len(seen) // (len(configs) + 1)  # one call per unit kind and prediction
    assert sum(seen[:kinds]) <= len(configs) * layers  # the four repeats of every configuration cost nothing
