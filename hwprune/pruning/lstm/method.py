"""The registered ``lstm`` method: :class:`LSTMPruning` behind the :class:`~hwprune.pruning.methods.Pruner` protocol.

It runs :class:`~hwprune.pruning.lstm.search.LSTMSearch` at the goal :func:`hwprune.prune_to_target`
gives it, on the training split of ``--data`` (recovery batches) and a held-out part of it (the
reward), and returns the network that met the goal: its widths and surviving channels, per-channel
scores for the device correction (the consumer energy of live channels; removed channels keep the
one they had when they went, which orders restoring), and a ``build`` that cuts any widths out of
the network's full-architecture weights. ``info`` carries the step log, the recovery iterations
(``lstm_train_iters`` of ``lstm_batch_size`` images: training spent inside the method) and the
controller's updates.

Settings come as ``job.options`` (``--budget-minutes`` and ``--option KEY=VALUE``;
:class:`~hwprune.pruning.lstm.search.LSTMConfig`). The state lives in ``work_dir`` (default: a
directory under the hwprune cache named by the model, its weights, the objective, the goal and
the settings), so that running the same command again resumes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

from hwprune.errors import HwpruneError
from hwprune.pruning.methods import METHODS, MethodOutput, PruneJob


@METHODS.register("lstm", "LSTM-guided pruning (Where to Prune): an LSTM picks the groups each step prunes, "
                          "REINFORCE on held-out accuracy against the cost")
class LSTMPruning:
    needs_data: ClassVar[bool] = True

    def validate(self, options: dict[str, Any]) -> None:
        from hwprune.pruning.lstm.search import config_from_options

        config_from_options(options)

    def __call__(self, job: PruneJob, goal: float) -> MethodOutput:
        from hwprune.progress import item_progress
        from hwprune.pruning.lstm.search import LSTMSearch, check_goal, config_from_options
        from hwprune.pruning.space import WidthConfig

        cfg = config_from_options(job.options, goal, job.min_keep)
        check_goal(job.space, job.cost, goal, job.min_keep)
        if job.data is None:
            raise HwpruneError("the lstm method trains its children: it needs --data")
        train, held, per_epoch = loaders(job, cfg.batch_size)
        search = LSTMSearch(job.space, job.model, job.cost, train, held, cfg, work_dir_for(job, cfg))
        with item_progress("LSTM", enabled=not job.quiet) as update:
            search.progress = update
            res = search.run()
        net = res.net

        def build(widths: WidthConfig, keep: dict[str, list[int]]):
            return search.surgeon.build(widths.widths, keep, net.state).eval()

        info = {"lstm_log": res.log, "lstm_groups": [g.id for g in job.space.groups], "lstm_settings": res.settings,
                "lstm_base_accuracy": res.base_accuracy, "lstm_accuracy": net.accuracy, "lstm_cost_fraction": net.cost,
                "lstm_train_iters": res.train_iters, "lstm_batch_size": cfg.batch_size,
                "lstm_train_images": res.train_iters * cfg.batch_size,
                "lstm_train_epochs": res.train_iters * cfg.batch_size / per_epoch, "lstm_children": res.children,
                "lstm_controller_updates": res.updates, "lstm_seconds": res.seconds,
                "lstm_finished_by": res.finished_by, "lstm_work_dir": str(res.work_dir),
                "lstm_sensitivity": str(res.sensitivity) if res.sensitivity else None}
        return MethodOutput(WidthConfig(job.space.name, dict(net.widths)), net.keep, res.scores, build,
                            "consumer-energy", info, prior=res.scores)


def loaders(job: PruneJob, batch_size: int):
    """Recovery batches of ``batch_size`` (the training loader's batches of 128, split), held-out batches,
    and the images of one recovery epoch."""
    from hwprune.pruning.methods import _gcp_loaders

    train, held = _gcp_loaders(job)
    per_epoch = sum(len(y) // batch_size * batch_size for _, y in train())
    if per_epoch == 0:
        raise HwpruneError("the training split holds fewer than 128 images beside the held-out split",
                           "pass more training data")

    def batches():
        for x, y in train():
            for i in range(0, len(y) - batch_size + 1, batch_size):
                yield x[i:i + batch_size], y[i:i + batch_size]

    return (train if batch_size == 128 else batches), held, per_epoch


def work_dir_for(job: PruneJob, cfg) -> Path:
    """``options["work_dir"]``, or a directory under the hwprune cache named by everything the run depends on."""
    if job.options.get("work_dir"):
        return Path(job.options["work_dir"])
    from dataclasses import asdict

    from hwprune.pruning.lstm.search import run_identity
    from hwprune.training.data import default_cache_dir

    ident = {**run_identity(job.space, job.model, job.cost, cfg), **asdict(cfg), "goal": round(cfg.goal, 2)}
    ident.pop("budget_minutes")
    key = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_dir().parent / "lstm" / f"{job.space.name}-{key}"
