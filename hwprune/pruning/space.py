"""The width space of a model: its prunable channel groups and width configurations.

Channels that must be pruned together (all convolutions joined by residual adds, a
depthwise convolution and the convolution feeding it) form one :class:`ChannelGroup`,
found with Torch-Pruning's dependency graph. A group's id is a stable, readable name: the
first module (in ``named_modules`` order) whose output channels belong to it.

Grouped convolutions (``1 < groups < channels``, ResNeXt, RegNet) keep their number of
conv groups and are pruned *narrower*: a channel group that feeds one or comes out of one
keeps the same channels in every conv group, so its width is a multiple of ``groups``
(:attr:`ChannelGroup.step`, "step 32") and its channels are kept or removed in *units*
of ``step`` channels, one at the same position in each conv group
(:meth:`ChannelGroup.units`). That is also the only pruning Torch-Pruning's surgery does
right: it slices a grouped convolution's input weights by the positions kept in the first
conv group. Depthwise convolutions (``groups == channels``) are coupled with their producer
instead and take any width. Channel groups that cross a ShuffleNetV2 channel shuffle stay
whole (the shuffle interleaves the two branches, which Torch-Pruning cannot follow).

A :class:`WidthConfig` gives every group a channel count; :meth:`PruningSpace.apply`
turns it into a physically smaller ``nn.Module`` by Torch-Pruning's surgery.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from hwprune.errors import HwpruneError


@dataclass(frozen=True)
class ChannelGroup:
    id: str
    channels: int
    modules: tuple[str, ...]  # modules whose output channels this group prunes
    kind: str  # "conv" | "residual" | "depthwise" | "grouped" | "linear"
    consumers: tuple[str, ...] = ()  # conv/linear modules whose input channels it prunes
    norms: tuple[str, ...] = ()  # normalisation layers whose channels it prunes
    step: int = 1  # widths must be multiples of this: the conv groups of the grouped convolutions it touches
    constraint: str = ""  # why ``step`` > 1: "grouped convolution layer1.0.conv2, groups=32"

    def __str__(self) -> str:
        more = f" (+{len(self.modules) - 1} coupled)" if len(self.modules) > 1 else ""
        return f"{self.id}: {self.channels} channels, {self.kind}{more}{self.constraint_text()}"

    def constraint_text(self) -> str:
        """``", step 32 (grouped convolution layer1.0.conv2, groups=32)"``, or ``""`` for a free group."""
        return f", step {self.step} ({self.constraint})" if self.step > 1 else ""

    def valid_widths(self) -> list[int]:
        return list(range(self.step, self.channels + 1, self.step))

    def round_width(self, width: float, mode: str = "nearest") -> int:
        """The valid width nearest to ``width`` (``mode`` "down"/"up": at most/at least it, where one exists)."""
        q = float(width) / self.step
        k = math.floor(q) if mode == "down" else math.ceil(q) if mode == "up" else math.floor(q + 0.5)
        return int(min(self.channels, max(1, k) * self.step))

    def check_width(self, width: int) -> None:
        """Raise a one-line error when ``width`` is not a valid width of this group."""
        if width < 1 or width > self.channels:
            raise HwpruneError(f"width of group '{self.id}' must be between 1 and {self.channels}, got {width}")
        if width % self.step:
            raise HwpruneError(f"{self.id} group: width {width} is not a multiple of {self.step} ({self.constraint})")

    def units(self) -> np.ndarray:
        """[channels // step, step] channel indices kept or removed together: row ``p`` holds
        position ``p`` of every conv group (row ``p`` is ``[p]`` when ``step`` is 1)."""
        per = self.channels // self.step
        return np.arange(per)[:, None] + per * np.arange(self.step)[None, :]

    def keep_units(self, n_units: int) -> list[int]:
        """The first ``n_units`` positions of every conv group (the default surviving channels)."""
        return sorted(int(i) for i in self.units()[:n_units].ravel())

    def keep_top(self, scores: Sequence[float], width: int) -> list[int]:
        """The ``width`` channels of the best-scoring units (a unit scores its channels' mean;
        ties broken by position)."""
        self.check_width(width)
        return top_units(scores, self.units(), width // self.step)

    def check_keep(self, kept: Sequence[int], width: int) -> list[int]:
        """``kept`` sorted, after checking it is ``width`` distinct channels made of whole units."""
        kept = sorted(int(i) for i in kept)
        n = self.channels
        if len(kept) != width or len(set(kept)) != width or kept[0] < 0 or kept[-1] >= n:
            raise HwpruneError(f"keep indices of group '{self.id}' must be {width} distinct channels in [0, {n})")
        if self.step > 1:
            alive = np.zeros(n, dtype=bool)
            alive[kept] = True
            if not (alive[self.units()].all(axis=1) | ~alive[self.units()].any(axis=1)).all():
                raise HwpruneError(f"keep indices of group '{self.id}' must keep the same positions in each of its "
                                   f"{self.step} conv groups ({self.constraint})")
        return kept


@dataclass
class WidthConfig:
    """Channels kept per group: ``{"model": NAME, "widths": {GROUP_ID: channels}}``."""

    model: str
    widths: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model": self.model, "widths": dict(self.widths)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> Path:
        from hwprune.atomic import atomic_write_text

        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: Mapping) -> "WidthConfig":
        if not isinstance(d, Mapping) or "widths" not in d or not isinstance(d["widths"], Mapping):
            raise HwpruneError("a width configuration must be a JSON object with a 'widths' mapping",
                               'expected {"model": NAME, "widths": {GROUP_ID: channels}}')
        return cls(model=str(d.get("model", "")), widths=dict(d["widths"]))

    @classmethod
    def load(cls, path: str | Path) -> "WidthConfig":
        p = Path(path)
        if not p.is_file():
            raise HwpruneError(f"width file '{p}' does not exist")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise HwpruneError(f"width file '{p}' is not valid JSON: {e.msg} at line {e.lineno}") from None


def is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def is_grouped(conv: nn.Conv2d) -> bool:
    """A grouped convolution proper: more than one conv group, and not depthwise."""
    return conv.groups > 1 and not is_depthwise(conv)


def top_units(scores: Sequence[float], units: np.ndarray, n: int) -> list[int]:
    """Sorted channel indices of the ``n`` rows of ``units`` whose channels score highest on
    average (ties broken by row)."""
    s = np.asarray(scores, dtype=np.float64)[units].mean(axis=1)
    order = np.lexsort((np.arange(len(s)), -s))
    return sorted(int(i) for i in units[order[:n]].ravel())


def _classifier(module: nn.Module) -> list[nn.Module]:
    lin = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return lin[-1:] if lin else []


class PruningSpace:
    """The prunable channel groups of one model."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], name: str = "model",
                 ignored: Iterable[nn.Module] | None = None):
        self.model = model
        self.name = name
        self.input_shape = tuple(int(s) for s in input_shape)
        names = {m: n for n, m in model.named_modules()}
        ignored = list(ignored) if ignored is not None else _classifier(model)
        self._ignored_names = [names[m] for m in ignored if m in names]
        self.groups: list[ChannelGroup] = self._find_groups(model)
        self._by_id = {g.id: g for g in self.groups}

    @classmethod
    def from_name(cls, name: str, input_size: int | None = None) -> "PruningSpace":
        from hwprune.models import create_model

        spec = create_model(name, input_size=input_size)
        return cls(spec.module, spec.input_shape(1), name=name)

    # -- groups --------------------------------------------------------------------
    def _dependency_graph(self, model: nn.Module):
        from hwprune.models import tp_customized_pruners

        x = torch.randn(self.input_shape)
        try:
            with torch.enable_grad():
                dg = tp.DependencyGraph().build_dependency(model, example_inputs=x,
                                                           customized_pruners=tp_customized_pruners())
        except Exception as e:  # a graph Torch-Pruning cannot follow (e.g. an unwrapped channel shuffle)
            raise HwpruneError(f"Torch-Pruning cannot trace the channel dependencies of '{self.name}' "
                               f"({type(e).__name__}: {e})", "this model family is not supported yet") from None
        mods = dict(model.named_modules())
        ignored = [mods[n] for n in self._ignored_names if n in mods]
        return dg, ignored

    def _raw_groups(self, model: nn.Module):
        """(output, input, norm) module names of every prunable Torch-Pruning group; groups
        that reach a module whose channels must stay whole (a channel shuffle) are left out."""
        from hwprune.models import FIXED_CHANNEL_TYPES

        dg, ignored = self._dependency_graph(model)
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        names = {m: n for n, m in model.named_modules()}
        out = []
        for g in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
            if any(isinstance(item.dep.target.module, FIXED_CHANNEL_TYPES) for item in g):
                continue
            outs, ins, norms = [], [], []
            for item in g:
                m = item.dep.target.module
                if m not in names:
                    continue
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    bucket = norms
                elif isinstance(m, (nn.Conv2d, nn.Linear)):
                    bucket = outs if dg.is_out_channel_pruning_fn(item.dep.handler) else ins
                else:
                    continue
                if names[m] not in bucket:
                    bucket.append(names[m])
            if not outs:
                continue
            for b in (outs, ins, norms):
                b.sort(key=lambda n: order[n])
            out.append((outs, ins, norms))
        return out

    @staticmethod
    def _step(channels: int, outs: list[str], ins: list[str], mods: Mapping[str, nn.Module]) -> tuple[int, str]:
        """The width step a group's grouped convolutions impose on it, and why."""
        step, why = 1, []
        for n in outs + ins:
            m = mods[n]
            if not (isinstance(m, nn.Conv2d) and is_grouped(m)):
                continue
            if (m.out_channels if n in outs else m.in_channels) != channels:  # reached through a concat or split
                return channels, f"grouped convolution {n} reached through a concatenation or split"
            step = math.lcm(step, m.groups)
            why.append(f"grouped convolution {n}, groups={m.groups}")
        return step, "; ".join(dict.fromkeys(why))

    def _find_groups(self, model: nn.Module) -> list[ChannelGroup]:
        mods = dict(model.named_modules())
        groups = []
        for outs, ins, norms in self._raw_groups(model):
            root = mods[outs[0]]
            channels = int(root.out_channels if isinstance(root, nn.Conv2d) else root.out_features)
            convs = [n for n in outs if isinstance(mods[n], nn.Conv2d)]
            if any(is_depthwise(mods[n]) for n in convs):
                kind = "depthwise"
            elif any(is_grouped(mods[n]) for n in convs):
                kind = "grouped"
            elif isinstance(root, nn.Linear):
                kind = "linear"
            elif len(convs) > 1:
                kind = "residual"
            else:
                kind = "conv"
            step, why = self._step(channels, outs, ins, mods)
            groups.append(ChannelGroup(id=outs[0], channels=channels, modules=tuple(outs), kind=kind,
                                       consumers=tuple(ins), norms=tuple(norms), step=step, constraint=why))
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        groups.sort(key=lambda gr: order[gr.id])
        return groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, gid: str) -> ChannelGroup:
        return self._by_id[gid]

    def __str__(self) -> str:
        lines = [f"PruningSpace({self.name}, {len(self.groups)} groups)"]
        lines += [f"  {g}" for g in self.groups]
        return "\n".join(lines)

    # -- configurations ------------------------------------------------------------
    def full(self) -> WidthConfig:
        return WidthConfig(self.name, {g.id: g.channels for g in self.groups})

    def kept_fractions(self, widths: WidthConfig | Mapping[str, int]) -> list[float]:
        """Kept fraction of every group's channels, in network order (missing groups: unpruned)."""
        w = widths.widths if isinstance(widths, WidthConfig) else widths
        return [w.get(g.id, g.channels) / g.channels for g in self.groups]

    def uniform(self, fraction: float, multiple: int = 1) -> WidthConfig:
        w = {}
        for g in self.groups:
            c = max(1, round(g.channels * fraction))
            if multiple > 1 and c >= multiple:
                c = min(g.channels, int(round(c / multiple)) * multiple)
            w[g.id] = g.round_width(c)
        return WidthConfig(self.name, w)

    def valid_widths(self, gid: str) -> list[int]:
        """Every width group ``gid`` can take (multiples of its step up to its channels)."""
        return self[gid].valid_widths()

    def round_width(self, gid: str, width: float, mode: str = "nearest") -> int:
        """``width`` moved to the nearest valid width of group ``gid`` (see :meth:`ChannelGroup.round_width`)."""
        return self[gid].round_width(width, mode)

    def channel_units(self, gid: str) -> np.ndarray:
        """Channel indices of group ``gid`` that are kept or removed together, one row per unit."""
        return self[gid].units()

    def width_array(self, configs: Sequence[WidthConfig | Mapping[str, int]]) -> np.ndarray:
        """[N, groups] integer widths of ``configs`` (groups in :attr:`groups` order, missing
        ones at full width), checked all at once. Any configuration that fails the vectorised
        checks is passed through :meth:`validate`, which names the problem in one line."""
        configs = list(configs)
        ids = [g.id for g in self.groups]
        full = {g.id: g.channels for g in self.groups}
        known = self._by_id.keys()
        dicts = []
        for cfg in configs:
            w = cfg.widths if isinstance(cfg, WidthConfig) else cfg
            if (isinstance(cfg, WidthConfig) and cfg.model and self.name != "model" and cfg.model != self.name) \
                    or not known >= w.keys():
                self.validate(cfg)  # raises
            dicts.append(w)
        rows = [[w.get(i, full[i]) for i in ids] for w in dicts]
        arr = np.asarray(rows, dtype=object).reshape(len(rows), len(ids))
        if arr.size and not set(map(type, arr.ravel())) <= {int}:  # numpy or float widths, bools
            arr = np.asarray([[self.validate(c).widths[i] for i in ids] for c in configs], dtype=np.int64)
        arr = arr.astype(np.int64).reshape(len(rows), len(ids))
        channels = np.array([g.channels for g in self.groups], dtype=np.int64)
        steps = np.array([g.step for g in self.groups], dtype=np.int64)
        bad = ((arr < 1) | (arr > channels) | (arr % steps != 0)).any(axis=1)
        for i in np.flatnonzero(bad)[:1]:
            self.validate(configs[int(i)])  # raises with the group and the reason
        return arr

    def validate(self, cfg: WidthConfig | Mapping[str, int], partial: bool = True) -> WidthConfig:
        """Check a configuration and fill missing groups with their full width."""
        if isinstance(cfg, WidthConfig):
            if cfg.model and self.name != "model" and cfg.model != self.name:
                raise HwpruneError(f"width configuration is for model '{cfg.model}', not '{self.name}'")
            widths = cfg.widths
        else:
            widths = dict(cfg)
        unknown = [k for k in widths if k not in self._by_id]
        if unknown:
            raise HwpruneError(f"unknown channel group '{unknown[0]}' for model '{self.name}'",
                               f"valid groups: {', '.join(g.id for g in self.groups[:6])}"
                               f"{', ...' if len(self.groups) > 6 else ''} (`hwprune groups --model {self.name}`)")
        out = {}
        for g in self.groups:
            if g.id not in widths:
                if not partial:
                    raise HwpruneError(f"width configuration lacks group '{g.id}'")
                out[g.id] = g.channels
                continue
            v = widths[g.id]
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not float(v).is_integer():
                raise HwpruneError(f"width of group '{g.id}' must be an integer, got {v!r}")
            v = int(v)
            g.check_width(v)
            out[g.id] = v
        return WidthConfig(self.name, out)

    def sample(self, rng: random.Random, min_fraction: float = 0.1,
               steps: Sequence[int] = (8, 16, 32), p_step: float = 0.5) -> WidthConfig:
        """One random configuration across the whole space.

        A global scale is drawn first and each group varies around it (so that small and
        large networks are both sampled, not only average ones); a width lands on a
        multiple of 8, 16 or 32 with probability ``p_step``, where latency staircases live.
        Every width is a valid width of its group (a multiple of its step).
        """
        scale = rng.uniform(min_fraction, 1.0)
        correlated = rng.random() < 0.7
        w = {}
        for g in self.groups:
            lo = g.round_width(max(1, math.ceil(min_fraction * g.channels)), "up")
            f = min(1.0, max(min_fraction, scale * rng.uniform(0.75, 1.25))) if correlated else rng.uniform(min_fraction, 1.0)
            c = max(lo, g.round_width(min(g.channels, max(lo, round(f * g.channels)))))
            if rng.random() < p_step:
                hw = rng.choice(list(steps))
                if g.channels >= hw:
                    cands = [m for m in g.valid_widths() if m >= lo and m % hw == 0]
                    if cands:
                        c = min(cands, key=lambda m: abs(m - c))
            w[g.id] = int(c)
        return WidthConfig(self.name, w)

    # -- surgery -------------------------------------------------------------------
    def apply(self, widths: WidthConfig | Mapping[str, int], model: nn.Module | None = None,
              keep: Mapping[str, Sequence[int]] | None = None, inplace: bool = False) -> nn.Module:
        """A physically smaller copy of ``model`` (default: the space's model).

        ``keep`` optionally names, per group, the channel indices that survive (chosen by
        an importance criterion, whole units of a grouped group: :meth:`ChannelGroup.keep_top`);
        otherwise the first ``width`` channels are kept (the first ``width / step`` of each
        conv group of a grouped group).
        """
        cfg = self.validate(widths)
        model = model if model is not None else self.model
        if not inplace:
            model = copy.deepcopy(model)
        mods = dict(model.named_modules())
        todo = {gid: w for gid, w in cfg.widths.items() if w < self._by_id[gid].channels}
        if not todo:
            return model
        dg, _ = self._dependency_graph(model)
        for gid, w in todo.items():
            root = mods[gid]
            fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
            g = self._by_id[gid]
            n = g.channels
            kept = g.check_keep(keep[gid], w) if keep is not None and gid in keep else g.keep_units(w // g.step)
            kept_set = set(kept)
            idxs = [i for i in range(n) if i not in kept_set]
            group = dg.get_pruning_group(root, fn, idxs=idxs)
            group.prune()
        return model

    def widths_of(self, model: nn.Module) -> WidthConfig:
        """Read the widths of a (pruned) copy of this space's model."""
        mods = dict(model.named_modules())
        w = {}
        for g in self.groups:
            m = mods[g.id]
            w[g.id] = int(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
        return WidthConfig(self.name, w)


def apply_widths(module: nn.Module, widths: Mapping[str, int], input_size: Sequence[int], name: str = "model") -> nn.Module:
    """Prune ``module`` in place to ``widths`` (used when rebuilding checkpoints)."""
    space = PruningSpace(module, (1, *input_size), name=name)
    return space.apply(widths, inplace=True)
