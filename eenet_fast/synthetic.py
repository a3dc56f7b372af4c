"""Synthetic exit outputs with known structure, for tests and benchmarks.

Every sample has a difficulty ``d ~ U(0, 1)``; exit ``k`` is right when ``d`` is below its skill
(skills rise from exit to exit, plus a little noise), otherwise it predicts a random wrong class.
For the predicted class's logit margin there are two kinds of classes:

* calibrated classes: the margin grows with ``skill_k - d``, so the max score tells right from wrong;
* miscalibrated classes (``miscalibrated`` of them, when predicted): the margin is high whatever the
  sample, so the max score is confidently wrong as often as right.

A max-score rule exits many wrong "miscalibrated" predictions early; a scheduler with a per-class
term (EENet's ``w . p``) can learn to distrust those classes.
"""

from __future__ import annotations

import torch

from eenet_fast.outputs import ExitOutputs

__all__ = ["make_synthetic_outputs"]


def make_synthetic_outputs(
    num_samples: int,
    num_exits: int = 4,
    num_classes: int = 10,
    *,
    miscalibrated: int = 3,
    class_skew: float = 0.0,
    costs: list[float] | None = None,
    seed: int = 0,
) -> ExitOutputs:
    """Labelled synthetic logits ``[K, N, C]`` (float32) with costs ``[K]`` (default ``k / K``).

    Args:
        num_samples: ``N``.
        num_exits: ``K``.
        num_classes: ``C``.
        miscalibrated: how many classes (the first ones) are confidently predicted whether right or not.
        class_skew: 0 makes every class equally hard; ``s > 0`` raises class ``c``'s difficulty to the
            power ``exp(-s (2 c / (C - 1) - 1))``, so the last classes are harder than the first.
        costs: cumulative exit costs; default ``[1/K, 2/K, ..., 1]``.
        seed: the random seed; the same seed gives the same outputs.
    """
    g = torch.Generator().manual_seed(seed)
    n, k_, c = num_samples, num_exits, num_classes
    labels = torch.randint(c, (n,), generator=g)
    difficulty = torch.rand(n, generator=g)
    if class_skew:
        difficulty = difficulty ** torch.exp(-class_skew * (2 * labels / (c - 1) - 1))
    skills = torch.linspace(0.55, 0.92, k_)
    logits = torch.empty(k_, n, c)
    for k in range(k_):
        right = difficulty + 0.05 * torch.randn(n, generator=g) < skills[k]
        wrong_class = (labels + 1 + torch.randint(c - 1, (n,), generator=g)) % c
        prediction = torch.where(right, labels, wrong_class)
        margin = 1.0 + 6.0 * (skills[k] - difficulty).clamp_min(0) + 0.3 * torch.randn(n, generator=g)
        overconfident = prediction < miscalibrated
        margin = torch.where(overconfident, 4.0 + 0.5 * torch.randn(n, generator=g), margin)
        exit_logits = 0.5 * torch.randn(n, c, generator=g)
        exit_logits[torch.arange(n), prediction] += margin
        logits[k] = exit_logits
    if costs is None:
        costs = [(k + 1) / k_ for k in range(k_)]
    return ExitOutputs(logits, labels=labels, costs=costs)
