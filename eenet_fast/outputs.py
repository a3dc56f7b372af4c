"""Cached outputs of every exit of a multi-exit model: the data every policy is fitted and judged on.

File formats
------------
* ``.npz`` with keys ``logits`` *or* ``probs`` (``[K, N, C]``), ``labels`` (``[N]``, optional) and
  ``costs`` (``[K]``, optional).
* The authors' cached format: a torch file (``.pt``/``.pth``) holding softmax outputs ``[K, N, C]``,
  either as a bare tensor or as a dict with the same keys as the ``.npz``. It is read with
  ``weights_only=True``: no pickle is executed.

Other keys are ignored. A file that cannot be read, is corrupted or holds something else is a
:class:`~eenet_fast.errors.FileFormatError` naming the file (see :func:`eenet_fast.files.read_arrays`);
:meth:`ExitOutputs.save` writes the file whole or not at all.

Probabilities are kept as their logarithms (clamped at float32's smallest normal number), which are
logits of the same softmax: one name, ``logits``, whatever the file held. ("Scores" in this library
are always the exit policy's scores ``q``.)
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from eenet_fast.errors import FileFormatError, InputError
from eenet_fast.features import ExitFeatures, exit_features
from eenet_fast.files import read_arrays, write_atomic

__all__ = ["ExitOutputs", "check_costs"]

_PROB_SUM_TOL = 1e-2
VALID_FILE = (
    "a valid exit-output file is an .npz with 'logits' or 'probs' (floats [K, N, C]: exits, samples, classes), "
    "optionally 'labels' (integers [N]) and 'costs' (numbers [K]), or a torch file (.pt) of a probabilities "
    "tensor [K, N, C] or of a dict with those keys"
)


def _tensor(value: Any, name: str) -> torch.Tensor:
    """``value`` (a tensor, numpy array, nested list or number) as a tensor of numbers on its device;
    unsigned integers become int64 and floats wider than 64 bits float64."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise InputError(f"{name} must be an array of numbers, got {type(value).__name__} ({error})") from None
    if array.dtype.kind not in "biuf":
        raise InputError(f"{name} must be an array of numbers, got an array of {array.dtype}")
    if array.dtype.kind == "u":
        array = array.astype(np.int64)
    elif array.dtype.kind == "f" and array.dtype.itemsize > 8:
        array = array.astype(np.float64)
    return torch.as_tensor(array)


def check_costs(costs: Sequence[float] | torch.Tensor | np.ndarray, num_exits: int) -> torch.Tensor:
    """Validate cumulative exit costs and return them as a float64 tensor ``[K]``.

    ``costs[k]`` is the cumulative cost to reach and evaluate exit ``k`` (stages ``0..k`` plus head
    ``k``), in any unit. They must be finite, positive and strictly increasing.
    """
    c = _tensor(costs, "costs").double()
    if c.ndim != 1 or c.numel() != num_exits:
        raise InputError(
            f"costs must be a list of {num_exits} numbers (one cumulative cost per exit), "
            f"got shape {tuple(c.shape)}"
        )
    if not torch.isfinite(c).all() or (c <= 0).any():
        raise InputError(f"costs must be finite and positive, got {c.tolist()}")
    if num_exits > 1 and not (c[1:] > c[:-1]).all():
        raise InputError(
            f"costs must be cumulative, so strictly increasing from exit to exit, got {c.tolist()}: "
            "give the cost to reach and evaluate each exit (stages 1..k plus head k), not per-stage costs"
        )
    return c


@dataclass(frozen=True)
class ExitOutputs:
    """Outputs of all ``K`` exits on ``N`` samples with ``C`` classes.

    Build from probabilities with :meth:`from_probs`.

    Attributes:
        logits: ``[K, N, C]`` floating tensor, the exits' logits.
        labels: ``[N]`` int64 class indices in ``[0, C)``, or ``None`` when unknown.
        costs: ``[K]`` float64 cumulative costs, or ``None`` when not given.
    """

    logits: torch.Tensor
    labels: torch.Tensor | None = None
    costs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        s = _tensor(self.logits, "logits")
        if s.ndim != 3:
            raise InputError(
                f"exit outputs must have shape [K, N, C] (exits, samples, classes), got {tuple(s.shape)}"
            )
        if not s.is_floating_point():
            raise InputError(f"exit outputs must be floating point (logits or probabilities), got {s.dtype}")
        k, n, c = s.shape
        if k < 1 or c < 2:
            raise InputError(f"need at least 1 exit and 2 classes, got K={k}, C={c}")
        bad = ~torch.isfinite(s)
        if bad.any():
            exit_idx, sample_idx, _ = bad.nonzero()[0].tolist()
            raise InputError(
                f"exit outputs contain {int(bad.sum())} NaN/Inf values (first at exit {exit_idx}, "
                f"sample {sample_idx}): fix the model or drop those samples before calibrating"
            )
        object.__setattr__(self, "logits", s)
        if self.labels is not None:
            y = _tensor(self.labels, "labels")
            if y.shape != (n,):
                raise InputError(f"labels must have shape [N] = [{n}], got {tuple(y.shape)}")
            if y.is_floating_point() and n and not bool((y == y.round()).all()):
                raise InputError("labels must be integer class indices, got non-integer floats")
            y = y.long()
            if n and (int(y.min()) < 0 or int(y.max()) >= c):
                raise InputError(f"labels must lie in [0, {c - 1}] for C={c} classes, got [{int(y.min())}, {int(y.max())}]")
            object.__setattr__(self, "labels", y)
        if self.costs is not None:
            object.__setattr__(self, "costs", check_costs(self.costs, k))

    @classmethod
    def from_probs(
        cls,
        probs: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | None = None,
        costs: Sequence[float] | torch.Tensor | None = None,
    ) -> "ExitOutputs":
        """Outputs from softmax probabilities ``[K, N, C]`` (rows summing to 1 within 1e-2), kept as
        their logarithms."""
        p = _tensor(probs, "probabilities")
        if not p.is_floating_point():
            raise InputError(f"probabilities must be floating point, got {p.dtype}")
        if p.ndim != 3:
            raise InputError(f"probabilities must have shape [K, N, C] (exits, samples, classes), got {tuple(p.shape)}")
        if bool((p < 0).any()) or not bool(torch.isfinite(p).all()):
            raise InputError("probabilities must be finite and >= 0; if these are logits, store them under the key 'logits'")
        worst = float((p.double().sum(-1) - 1).abs().max()) if p.numel() else 0.0
        if worst > _PROB_SUM_TOL:
            raise InputError(
                f"probabilities must sum to 1 over classes (worst row is off by {worst:.3g}); "
                "if these are logits, store them under the key 'logits'"
            )
        logits = torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
        return cls(logits, labels, costs)

    # ------------------------------------------------------------------ shape
    @property
    def num_exits(self) -> int:
        return self.logits.shape[0]

    @property
    def num_samples(self) -> int:
        return self.logits.shape[1]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[2]

    # -------------------------------------------------------------- derived
    @cached_property
    def features(self) -> list[ExitFeatures]:
        """Per-exit confidence features (see :func:`eenet_fast.features.exit_features`)."""
        return [exit_features(self.logits[k]) for k in range(self.num_exits)]

    @cached_property
    def correct(self) -> torch.Tensor:
        """``[K, N]`` bool: whether exit ``k`` predicts sample ``n`` correctly."""
        y = self.require_labels()
        return torch.stack([f.prediction == y for f in self.features])

    def require_labels(self) -> torch.Tensor:
        if self.labels is None:
            raise InputError("these exit outputs have no labels; labels are needed to calibrate and evaluate")
        return self.labels

    def require_costs(self) -> torch.Tensor:
        if self.costs is None:
            raise InputError(
                "no exit costs known: store 'costs' in the file or pass them "
                "(costs=[c1, ..., cK], or --costs c1,...,cK on the command line)"
            )
        return self.costs

    def with_costs(self, costs: Sequence[float] | torch.Tensor | None) -> "ExitOutputs":
        """A copy whose costs are replaced (``None`` keeps the current ones)."""
        if costs is None:
            return self
        return ExitOutputs(self.logits, self.labels, check_costs(costs, self.num_exits))

    def subset(self, index: torch.Tensor) -> "ExitOutputs":
        """The outputs of the samples ``index`` (bool mask ``[N]`` or int64 indices)."""
        labels = None if self.labels is None else self.labels[index]
        return ExitOutputs(self.logits[:, index], labels, self.costs)

    # ------------------------------------------------------------------- I/O
    @classmethod
    def load(cls, path: str | Path) -> "ExitOutputs":
        """Read ``.npz`` (keys ``logits``/``probs``, ``labels``, ``costs``) or a torch file of probabilities.

        Raises:
            FileNotFoundError: no file at ``path``.
            FileFormatError: the file cannot be read, is corrupted, or its content is not valid
                exit outputs (the message names the file, the problem and what a valid file holds).
        """
        path = Path(path)
        data = read_arrays(path, VALID_FILE)
        has_logits, has_probs = "logits" in data, "probs" in data
        if has_logits == has_probs:
            raise FileFormatError(
                f"{path} must hold exactly one of the keys 'logits' or 'probs' ([K, N, C]), "
                f"found keys {sorted(data)}; {VALID_FILE}"
            )
        try:
            if has_probs:
                return cls.from_probs(data["probs"], data.get("labels"), data.get("costs"))
            return cls(data["logits"], data.get("labels"), data.get("costs"))
        except InputError as error:
            raise FileFormatError(f"{path} does not hold valid exit outputs: {error}") from None

    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` readable by :meth:`load`, whole or not at all (see :func:`eenet_fast.files.write_atomic`)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise InputError(f"save writes .npz files, got {path}: give a name ending in .npz")
        logits = self.logits.float() if self.logits.dtype == torch.bfloat16 else self.logits  # numpy has no bfloat16
        arrays: dict[str, np.ndarray] = {"logits": logits.cpu().numpy()}
        if self.labels is not None:
            arrays["labels"] = self.labels.cpu().numpy()
        if self.costs is not None:
            arrays["costs"] = self.costs.cpu().numpy()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomic(path, buffer.getvalue())
