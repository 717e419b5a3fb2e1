"""A fitted latency predictor saved as a file, and the cache of it beside its table.

Fitting a :class:`~hwprune.prediction.predictor.LatencyPredictor` takes seconds to minutes; loading
its artifact takes a small fraction of that, and the loaded predictor predicts bit for bit
what the fitted one does.

The artifact is a zip archive of two members:

* ``hwprune.json``, the header: the format, :data:`hwprune.prediction.features.FEATURE_VERSION`, the
  versions of hwprune, scikit-learn, skops and numpy that saved it, the name and SHA-256
  of the table it was fitted on, the predictor's parameters and a summary. It is read and
  checked before anything else is.
* ``predictor.skops``, in the format of ``skops.io``: the fitted predictor (without torch
  modules: :meth:`~hwprune.prediction.predictor.LatencyPredictor.without_modules`) and the trees of
  its tree ensembles, packed into one array per field (:func:`_pack`). skops writes every
  array as a zip member of its own, with an object around each tree, and a predictor's
  ensembles hold some 4,000 arrays: read one by one they take seconds. Packed, a load
  reads a few dozen arrays and rebuilds the trees from them, after checking that every
  node's links stay inside its tree (:func:`_check_links`; scikit-learn follows them
  unchecked, which is why skops does not trust tree types by default).

Why skops: a pickle (or joblib) file runs whatever code it names when it is loaded.
``skops.io`` stores objects as data (JSON plus numpy arrays) and builds only the types the
loader trusts: numpy, built-ins and scikit-learn estimators by default, plus the fixed list
:data:`TRUSTED` of this module (hwprune's predictor classes, which hold data only). An
artifact that needs any other type is refused before one object is built. ONNX (skl2onnx) would cover the tree regressors but not the rest of a predictor
(model templates, calibration maps, the clipped extras, the feature ranges that flag
extrapolation), and its tree ensembles compute in float32, so predictions would not stay
bit-identical.

Compatibility: an artifact is used only with the same feature version and the same
versions of hwprune, scikit-learn, skops and numpy, and only for the table whose hash it
records. Anything else is a one-line :class:`~hwprune.errors.HwpruneError` when the
artifact was given explicitly (``--predictor``); the cache beside a table
(:func:`predictor_for`) is refitted and replaced instead.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from hwprune.errors import HwpruneError, TableError
from hwprune.atomic import atomic_write_bytes
from hwprune.prediction.features import FEATURE_VERSION
from hwprune.prediction.predictor import LatencyPredictor

if TYPE_CHECKING:
    from hwprune.profiling.table import LatencyTable

FORMAT = "hwprune.predictor/2"
HEADER, PAYLOAD = "hwprune.json", "predictor.skops"
#: the cache of a table's predictor: ``resnet50.parquet`` -> ``resnet50.predictor.zip``
CACHE_SUFFIX = ".predictor.zip"
#: types a saved predictor holds beyond those skops trusts by default
TRUSTED = frozenset({
    "hwprune.prediction.predictor.LatencyPredictor",
    "hwprune.prediction.calibrated.CalibratedPredictor",
    "hwprune.prediction.correction.Correction",
    "hwprune.prediction.extras._Extras",
    "hwprune.prediction.e2e_map._ModelFit",
    # where the two classes above lived before the predictor module was split: artifacts saved
    # then name these paths (the names are still importable there)
    "hwprune.prediction.predictor._Extras",
    "hwprune.prediction.predictor._ModelFit",
    "hwprune.pruning.space.ChannelGroup",
    "hwprune.pruning.space.PruningSpace",
    "hwprune.profiling.layer_shapes.LayerSlot",
    "hwprune.profiling.layer_shapes.ModelTemplate",
})


def library_versions() -> dict[str, str]:
    """The versions an artifact must be loaded with."""
    import numpy
    import sklearn
    import skops

    from hwprune import __version__

    return {"hwprune": __version__, "scikit-learn": sklearn.__version__, "skops": skops.__version__,
            "numpy": numpy.__version__}


def table_digest(table_path: str | Path) -> str:
    """SHA-256 of the table file's bytes."""
    p = Path(table_path)
    if not p.is_file():
        raise TableError(f"table '{p}' does not exist", "make one with `hwprune profile ... --out PATH`")
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError as e:
        raise HwpruneError(f"cannot read table '{p}': {e.strerror}") from None


def cache_path(table_path: str | Path) -> Path:
    """Where :func:`predictor_for` caches the predictor of the table at ``table_path``."""
    p = Path(table_path)
    return p.with_name(p.name.rsplit(".", 1)[0] + CACHE_SUFFIX)


# ---------------------------------------------------------------------------------------
# Tree ensembles, packed
# ---------------------------------------------------------------------------------------
_BOOSTING_FIELDS = ("nodes", "binned_left_cat_bitsets", "raw_left_cat_bitsets")


def _concat(parts: list, into: dict, name: str) -> None:
    into[name] = np.concatenate(parts)
    into[name + "_sizes"] = np.array([len(a) for a in parts], dtype=np.int64)


def _split(packed: Mapping, name: str) -> list[np.ndarray]:
    sizes = np.asarray(packed[name + "_sizes"], dtype=np.int64)
    if (sizes < 0).any() or sizes.sum() != len(packed[name]):
        raise ValueError(f"the packed trees' {name} do not add up")
    return np.split(packed[name], np.cumsum(sizes)[:-1])


def _forest_types() -> tuple[type, ...]:
    from sklearn.ensemble import ExtraTreesRegressor, RandomForestRegressor

    return ExtraTreesRegressor, RandomForestRegressor


def _pack(est, key: str, trees: dict):
    """``est``, or for a tree ensemble a copy without its trees, which go to ``trees[key]``
    as a few arrays (each field of every tree concatenated, and each tree's length)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    if isinstance(est, HistGradientBoostingRegressor):
        flat = [t for it in est._predictors for t in it]
        out = trees[key] = {"kind": "boosting", "per_iteration": len(est._predictors[0])}
        for f in _BOOSTING_FIELDS:
            _concat([getattr(t, f) for t in flat], out, f)
        est = copy.copy(est)
        est._predictors = []
    elif isinstance(est, _forest_types()):
        trees[key] = _pack_forest(est.estimators_)
        est = copy.copy(est)
        est.estimators_ = []
    return est


def _pack_forest(subs: list) -> dict:
    """A forest's trees: one prototype estimator (the trees differ only in their seed and
    their ``tree_``) and the trees' states (``Tree.__reduce__``) concatenated."""
    proto = copy.copy(subs[0])
    proto.tree_, proto.random_state = None, None
    same = {k: v for k, v in vars(proto).items() if k not in ("tree_", "random_state")}
    for s in subs:
        mine = {k: v for k, v in vars(s).items() if k not in ("tree_", "random_state")}
        if mine.keys() != same.keys() or any(not _equal(mine[k], same[k]) for k in same) \
                or not isinstance(s.random_state, (int, np.integer)):
            raise ValueError(f"the trees of a forest differ in more than their seeds ({type(s).__name__})")
    _, (n_features, n_classes, n_outputs), _ = subs[0].tree_.__reduce__()
    states = [s.tree_.__getstate__() for s in subs]
    out = {"kind": "forest", "prototype": proto, "n_features": int(n_features), "n_classes": np.asarray(n_classes),
           "n_outputs": int(n_outputs), "random_state": np.array([s.random_state for s in subs], dtype=np.int64),
           "max_depth": np.array([st["max_depth"] for st in states], dtype=np.int64)}
    _concat([st["nodes"] for st in states], out, "nodes")
    _concat([st["values"] for st in states], out, "values")
    return out


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def _check_links(packed: Mapping, left: str, right: str, feature: str, inner: np.ndarray, n_features: int) -> None:
    """Refuse trees whose links could send a prediction out of bounds or round in a loop
    (scikit-learn follows them unchecked): in every tree of ``packed["nodes"]`` each inner
    node's children come after it and inside its tree, and it splits on one of the
    ``n_features`` features. Children are numbered within their tree."""
    nodes, sizes = packed["nodes"], np.asarray(packed["nodes_sizes"], dtype=np.int64)
    if not len(sizes) or (sizes < 1).any():
        raise ValueError("a packed tree has no nodes")
    end = np.cumsum(sizes)
    start = np.repeat(end - sizes, sizes)[inner]
    i, stop = np.arange(len(nodes))[inner], np.repeat(end, sizes)[inner]
    ok = all(((c > i) & (c < stop)).all() for c in (nodes[left][inner].astype(np.int64) + start,
                                                     nodes[right][inner].astype(np.int64) + start))
    if not (ok and ((nodes[feature][inner] >= 0) & (nodes[feature][inner] < n_features)).all()):
        raise ValueError("a tree's node links are out of bounds")


def _unpack(est, packed: Mapping | None) -> None:
    """Give a tree ensemble :func:`_pack` emptied its trees back."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    kind = packed.get("kind") if isinstance(packed, Mapping) else None
    if isinstance(est, HistGradientBoostingRegressor) and kind == "boosting":
        _unpack_boosting(est, packed)
    elif isinstance(est, _forest_types()) and kind == "forest":
        _unpack_forest(est, packed)
    elif kind is not None or isinstance(est, (HistGradientBoostingRegressor, *_forest_types())):
        raise ValueError(f"the trees of a {type(est).__name__} are missing or of another kind ({kind!r})")


def _unpack_boosting(est, packed: Mapping) -> None:
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor

    parts = [_split(packed, f) for f in _BOOSTING_FIELDS]
    if packed["nodes"].dtype != PREDICTOR_RECORD_DTYPE:
        raise ValueError("a boosting tree's nodes have another layout")
    _check_links(packed, "left", "right", "feature_idx", packed["nodes"]["is_leaf"] == 0, int(est.n_features_in_))
    flat = []
    for nodes, binned, raw in zip(*parts):
        if (nodes["bitset_idx"][(nodes["is_leaf"] == 0) & (nodes["is_categorical"] != 0)]
                >= min(len(binned), len(raw))).any():
            raise ValueError("a boosting tree's category bitsets are out of bounds")
        flat.append(TreePredictor(nodes, binned, raw))
    k = int(packed["per_iteration"])
    if k < 1 or not flat or len(flat) % k:
        raise ValueError("a boosting regressor's trees do not make whole iterations")
    est._predictors = [flat[i:i + k] for i in range(0, len(flat), k)]


def _unpack_forest(est, packed: Mapping) -> None:
    from sklearn.tree._tree import Tree

    n_features, proto = int(packed["n_features"]), packed["prototype"]
    if n_features != int(est.n_features_in_):
        raise ValueError("a forest's trees and the forest count features differently")
    rows = list(zip(packed["random_state"], packed["max_depth"], _split(packed, "nodes"), _split(packed, "values")))
    _check_links(packed, "left_child", "right_child", "feature", packed["nodes"]["left_child"] != -1, n_features)
    subs = []
    for seed, depth, nodes, values in rows:
        tree = Tree(n_features, np.asarray(packed["n_classes"], dtype=np.intp), int(packed["n_outputs"]))
        tree.__setstate__({"max_depth": int(depth), "node_count": len(nodes), "nodes": nodes, "values": values})
        sub = copy.copy(proto)
        sub.random_state, sub.tree_ = int(seed), tree
        subs.append(sub)
    est.estimators_ = subs


def _portable(pred: LatencyPredictor) -> dict:
    """What ``predictor.skops`` holds: the predictor without torch modules and its packed trees."""
    out = pred.without_modules()
    trees: dict[str, dict] = {}
    out.estimators_ = {k: _pack(e, f"kernel/{k}", trees) for k, e in pred.estimators_.items()}
    out.extras_ = {}
    for k, x in pred.extras_.items():
        out.extras_[k] = copy.copy(x)
        out.extras_[k].est = _pack(x.est, f"extras/{k}", trees)
    return {"predictor": out, "trees": trees}


def _restored(payload) -> LatencyPredictor:
    pred, trees = payload["predictor"], payload["trees"]
    for k, e in pred.estimators_.items():
        _unpack(e, trees.get(f"kernel/{k}"))
    for k, x in pred.extras_.items():
        _unpack(x.est, trees.get(f"extras/{k}"))
    return pred


# ---------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------
def _header(pred: LatencyPredictor, table_name: str, digest: str) -> dict:
    return {"format": FORMAT, "feature_version": FEATURE_VERSION, "versions": library_versions(),
            "table": {"name": table_name, "sha256": digest}, "params": pred.get_params(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "summary": pred.artifact_summary()}


def dumps_predictor(pred: LatencyPredictor, table_name: str, digest: str) -> bytes:
    """The artifact's bytes (:func:`save_predictor` writes them)."""
    import skops.io as sio

    if not isinstance(pred, LatencyPredictor):
        raise HwpruneError(f"only a LatencyPredictor is saved as a predictor artifact, not {type(pred).__name__}")
    portable = _portable(pred)
    header = json.dumps(_header(pred, table_name, digest), indent=1, default=str)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(HEADER, header + "\n")
        z.writestr(PAYLOAD, sio.dumps(portable, compression=zipfile.ZIP_DEFLATED, compresslevel=1))
    return buf.getvalue()


def save_predictor(pred: LatencyPredictor, path: str | Path, table_path: str | Path,
                   digest: str | None = None) -> Path:
    """Write ``pred``, fitted on the table at ``table_path``, atomically to ``path``.

    ``digest``: the table's SHA-256 taken before it was loaded for the fit (by default it is
    taken now)."""
    table_path = Path(table_path)
    digest = digest or table_digest(table_path)
    return atomic_write_bytes(path, dumps_predictor(pred, table_path.name, digest))


# ---------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------
def _open(path: Path) -> tuple[dict, bytes]:
    """(header, payload bytes) of an artifact; a one-line error for anything that is not one."""
    if not path.is_file():
        raise HwpruneError(f"predictor file '{path}' does not exist", "make one with `hwprune fit --table T --out P`")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if HEADER not in names or PAYLOAD not in names:
                raise HwpruneError(f"'{path}' is not an hwprune predictor (no {HEADER} and {PAYLOAD} in it)")
            header = json.loads(z.read(HEADER))
            payload = z.read(PAYLOAD)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:  # ValueError: bad JSON, bad CRC
        raise HwpruneError(f"predictor '{path}' is truncated, corrupt or not an hwprune predictor "
                           f"({type(e).__name__}: {_first_line(e)})", "fit it again with `hwprune fit`") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else None
        raise HwpruneError(f"'{path}' is not an hwprune predictor of format {FORMAT} (format {got!r})",
                           "fit it again with `hwprune fit`")
    return header, payload


def read_header(path: str | Path) -> dict:
    """The header of the artifact at ``path`` (format checked, nothing loaded)."""
    return _open(Path(path))[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else "no detail"


def mismatch(header: Mapping, digest: str | None = None) -> str | None:
    """Why an artifact with ``header`` must not be used (for the table of SHA-256 ``digest``), or None."""
    if header.get("feature_version") != FEATURE_VERSION:
        return f"it has feature version {header.get('feature_version')!r}, this hwprune uses {FEATURE_VERSION}"
    saved = header.get("versions") or {}
    for lib, now in library_versions().items():
        if saved.get(lib) != now:
            return f"it was saved with {lib} {saved.get(lib)}, this is {lib} {now}"
    table = header.get("table") or {}
    if digest is not None and table.get("sha256") != digest:
        return (f"it was fitted on another table ('{table.get('name')}', sha256 {str(table.get('sha256'))[:12]}), "
                f"not this one (sha256 {digest[:12]})")
    return None


def _loads(path: Path, payload: bytes) -> LatencyPredictor:
    import skops.io as sio
    from skops.io.exceptions import UntrustedTypesFoundException
    from sklearn.utils.validation import check_is_fitted

    try:
        payload = sio.loads(payload, trusted=sorted(TRUSTED))
        if not (isinstance(payload, dict) and isinstance(payload.get("predictor"), LatencyPredictor)):
            raise HwpruneError(f"'{path}' holds no hwprune LatencyPredictor")
        pred = _restored(payload)
        check_is_fitted(pred, "models_")
    except HwpruneError:
        raise
    except UntrustedTypesFoundException as e:
        raise HwpruneError(f"predictor '{path}' holds types no hwprune predictor holds ({_first_line(e)})",
                           "load only predictors that `hwprune fit` wrote") from None
    except Exception as e:  # skops and scikit-learn raise many types for a damaged payload
        raise HwpruneError(f"cannot load predictor '{path}' ({type(e).__name__}: {_first_line(e)})",
                           "fit it again with `hwprune fit`") from None
    return pred


def load_predictor(path: str | Path, table_path: str | Path | None = None, *,
                   digest: str | None = None) -> LatencyPredictor:
    """The predictor saved at ``path``, without refitting.

    With ``table_path`` (or the table's ``digest``), an artifact fitted on another table is
    refused, like one of another feature version or library versions, or a damaged file:
    every refusal is one :class:`HwpruneError` line."""
    path = Path(path)
    if digest is None and table_path is not None:
        digest = table_digest(table_path)
    header, payload = _open(path)
    why = mismatch(header, digest)
    if why:
        raise HwpruneError(f"predictor '{path}' does not fit: {why}",
                           f"fit it again: hwprune fit --table {table_path or 'TABLE'} --out {path}")
    return _loads(path, payload)


# ---------------------------------------------------------------------------------------
# The predictor of a --table
# ---------------------------------------------------------------------------------------
def _cached(path: Path, digest: str, params: Mapping) -> "LatencyPredictor | None":
    """The cached predictor at ``path`` when it is one of this table and these parameters."""
    if not path.is_file():
        return None
    try:
        header, payload = _open(path)
        if mismatch(header, digest) or header.get("params") != json.loads(json.dumps(dict(params), default=str)):
            return None
        return _loads(path, payload)
    except HwpruneError:
        return None


def predictor_for(table_path: str | Path | None, predictor_path: str | Path | None = None,
                  table: "LatencyTable | None" = None, params: Mapping | None = None) -> "LatencyPredictor | None":
    """The fitted predictor of the table at ``table_path`` (None without a table).

    With ``predictor_path`` (``--predictor``) that artifact is loaded and must match the
    table. Without it, the predictor cached beside the table (:func:`cache_path`) is loaded
    when it matches the table, ``params`` (the predictor's parameters; default: the
    defaults), the feature version and the library versions; otherwise one is fitted (on
    ``table`` when given, the already loaded table at ``table_path``) and the cache
    replaced, atomically, where the directory is writable."""
    if table_path is None:
        if predictor_path is not None:
            raise HwpruneError("--predictor goes with --table, the table it was fitted on")
        return None
    table_path = Path(table_path)
    digest = table_digest(table_path)
    if predictor_path is not None:
        return load_predictor(predictor_path, table_path, digest=digest)
    cache = cache_path(table_path)
    fresh = LatencyPredictor(**(params or {}))
    pred = _cached(cache, digest, fresh.get_params())
    if pred is not None:
        return pred
    from hwprune.profiling.table import LatencyTable

    pred = fresh.fit(table if table is not None else LatencyTable.load(table_path))
    try:
        atomic_write_bytes(cache, dumps_predictor(pred, table_path.name, digest))
    except (HwpruneError, OSError):  # a read-only directory: predict without a cache
        pass
    return pred
