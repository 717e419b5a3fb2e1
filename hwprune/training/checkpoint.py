"""Model checkpoints in a safe, module-free format.

A checkpoint is a ``torch.save``'d dict of plain data, readable with
``torch.load(weights_only=True)``::

    {"format": "hwprune.checkpoint/1", "arch": "cifar_resnet56", "num_classes": 10,
     "input_size": [3, 32, 32], "widths": {group_id: channels} or None,
     "state_dict": {...}, "meta": {...}}

The model is rebuilt from the architecture name (:func:`hwprune.models.create_model`)
and, for a pruned model, its per-group widths; modules are never pickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hwprune.atomic import atomic_write
from hwprune.errors import HwpruneError
from hwprune.models import ModelSpec, create_model

FORMAT = "hwprune.checkpoint/1"


@dataclass
class Checkpoint:
    """Weights plus what is needed to rebuild the model they belong to.

    ``widths`` maps a channel group to its kept width (``None`` for the unpruned
    architecture); ``meta`` is JSON-able information (training recipe, accuracy,
    normalisation...).
    """

    arch: str
    state_dict: dict[str, torch.Tensor]
    num_classes: int
    input_size: tuple[int, int, int]
    widths: dict[Any, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(cls, spec: ModelSpec, widths: dict[Any, int] | None = None,
                   meta: dict[str, Any] | None = None) -> "Checkpoint":
        """Capture ``spec.module``'s current weights."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in spec.module.state_dict().items()}
        return cls(arch=spec.name, state_dict=state, num_classes=int(spec.num_classes),
                   input_size=tuple(int(d) for d in spec.input_size), widths=_plain_widths(widths),
                   meta=dict(meta or {}))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the checkpoint atomically (temporary file, then rename)."""
        try:
            meta = json.loads(json.dumps(self.meta))  # plain types only, so weights_only loading accepts them
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint meta must be JSON-able: {e}") from e
        payload = {
            "format": FORMAT,
            "arch": self.arch,
            "num_classes": int(self.num_classes),
            "input_size": [int(d) for d in self.input_size],
            "widths": _plain_widths(self.widths),
            "state_dict": {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict.items()},
            "meta": meta,
        }
        return atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Checkpoint":
        """Read a checkpoint written by :meth:`save`; unreadable or foreign files raise :class:`HwpruneError`."""
        raw = load_format(path, FORMAT, "checkpoint", "create checkpoints with `hwprune train`")
        try:
            state = raw["state_dict"]
            ck = cls(arch=str(raw["arch"]), state_dict=dict(state), num_classes=int(raw["num_classes"]),
                     input_size=tuple(int(d) for d in raw["input_size"]), widths=raw.get("widths") or None,
                     meta=dict(raw.get("meta") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise HwpruneError(f"checkpoint {path} is incomplete: {e}", hint="the file is damaged; train it again") from e
        if len(ck.input_size) != 3 or not all(isinstance(v, torch.Tensor) for v in ck.state_dict.values()):
            raise HwpruneError(f"checkpoint {path} has a malformed input size or state dict")
        return ck

    def build_model(self) -> ModelSpec:
        """Rebuild the model (applying ``widths``) and load the weights; it is returned in eval mode."""
        spec = create_model(self.arch, num_classes=self.num_classes, input_size=self.input_size[1])
        if self.widths:
            from hwprune.pruning.space import apply_widths

            spec.module = apply_widths(spec.module, self.widths, self.input_size)
        try:
            spec.module.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = " ".join(line.strip() for line in first[1:3]) or first[0]
            raise HwpruneError(f"the weights do not fit {self.arch}"
                               f"{' with the stored widths' if self.widths else ''}: {detail}",
                               hint="the checkpoint was made for another architecture or is damaged") from e
        spec.module.eval()
        return spec


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the target folder, then rename it over ``path``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_format(path: str | os.PathLike, fmt: str, what: str, hint: str) -> dict:
    """A file of ``safe_torch_load`` whose ``format`` field is ``fmt``; anything else is a one-line error."""
    raw = safe_torch_load(path, what)
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise HwpruneError(f"{path} is not an hwprune {what} (format {found!r}, expected {fmt!r})", hint=hint)
    return raw


def safe_torch_load(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU, turning every failure into :class:`HwpruneError`."""
    path = Path(path)
    if not path.is_file():
        raise HwpruneError(f"{what} {path} does not exist", hint="check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, unsafe globals...
        text = str(e).strip()
        if "Unsupported global" in text:
            reason = "it holds objects other than tensors and plain data"
        else:
            reason = text.splitlines()[0] if text else type(e).__name__
        raise HwpruneError(f"cannot read {what} {path}: {reason[:200]}",
                           hint="the file is truncated, corrupted or not written by hwprune") from e


def _plain_widths(widths: dict[Any, int] | None) -> dict[Any, int] | None:
    return {k: int(v) for k, v in widths.items()} if widths else None
