"""EENet: a learned exit scheduler (Ilhan et al., WACV 2024), trained on cached validation outputs.

At exit ``k`` (0-based) with features ``p_k`` (``[N, C]`` probabilities), ``m_k`` (max score),
``e_k`` (entropy confidence) and the sample's earlier scores ``q_0..q_{k-1}``, with
``g_k = [m_k, e_k, q_0, ..., q_{k-1}]``:

* score head: ``q_k = w_k . p_k + u_k . g_k + v_k . relu(A_k g_k + b_k)``. It starts as the
  max-score rule (``w = 0``, ``u = [1, 0, ...]``, ``v = 0``); the ``w_k . p_k`` term is a per-class
  correction and the ReLU layer (``hidden`` wide, 0 to drop it) a small MLP on the confidences;
* assignment head (training only): ``a_k = MLP([p_k, g_k])`` with sigmoid hidden units, and the exit
  distribution ``pi = softmax_k(a_k)``.

Losses on the validation outputs (``acc_{n,k}`` = exit ``k`` is right on sample ``n``):

* ``L_bce = (1/K) sum_k sum_n w_{n,k} BCE(clamp(q_{n,k}, 0, 1), acc_{n,k})``, ``w_{n,k} = pi_{n,k} / sum_n pi_{n,k}``;
* ``L_kl = KL(t_n || pi_n)`` with ``t_{n,k} = q_{n,k} / sum_j q_{n,j}``;
* ``L_cost = |mean_n sum_k pi_{n,k} c_k - B| / B``.

Phases alternate every ``phase_epochs`` epochs: ``L_bce`` trains the score heads, then
``kl_weight L_kl + cost_weight L_cost`` trains the assignment heads. Thresholds: the mean of ``pi``
gives target exit fractions; the sequential quantile walk turns them into thresholds, tilted towards
cheaper exits until the validation cost meets the budget; random restarts around those fractions,
each also tried at half and three quarters of the budget's slack (a later exit is not always more
accurate), keep the one with the best validation accuracy.

Fixed relative to the authors' release: gradients are zeroed every step; the weights kept are a
copy, not a reference to the live model; every loss term is defined; the budget is met exactly
rather than within 10 %; and ``pi`` is the softmax of the assignment logits, because the softmax of
sigmoid outputs in ``(0, 1)`` keeps every exit's share within a factor ``e`` of the others and so
cannot express budgets near the first or the last exit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from eenet_fast.decision import ScoreHeadParams, head_score
from eenet_fast.errors import PolicyError
from eenet_fast.features import ExitFeatures
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies import options
from eenet_fast.policies.base import ExitHistory, Policy
from eenet_fast.policies.thresholds import best_over_bases, random_bases

__all__ = ["ScoreHead", "AssignmentHead", "Scheduler", "EENetPolicy"]

_EPS = 1e-6


class ScoreHead(nn.Module):
    """``q = w . p + u . g + v . relu(A g + b)``; starts as ``q = m`` (the max score, ``g[:, 0]``).

    Parameters: ``class_weight`` (``w``), ``linear`` (``u``), ``mlp_in`` (``A``, ``b``) and ``mlp_out`` (``v``).

    Args:
        num_classes: ``C``.
        num_inputs: width of ``g = [m, e, q_0..q_{k-1}]``, i.e. ``k + 2``.
        hidden: width of the ReLU layer (0: the linear head of the release).
    """

    def __init__(self, num_classes: int, num_inputs: int, hidden: int) -> None:
        super().__init__()
        self.class_weight = nn.Parameter(torch.zeros(num_classes))
        linear = torch.zeros(num_inputs)
        linear[0] = 1.0
        self.linear = nn.Parameter(linear)
        self.mlp_in = nn.Linear(num_inputs, hidden) if hidden else None
        self.mlp_out = nn.Parameter(torch.zeros(hidden)) if hidden else None

    def forward(self, probs: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``probs [N, C]``, ``g [N, k + 2]`` float32 -> ``q [N]`` float32."""
        mlp = self.mlp_in
        return head_score(probs, g, self.class_weight, self.linear, None if mlp is None else mlp.weight,
                          None if mlp is None else mlp.bias, self.mlp_out)


class AssignmentHead(nn.Module):
    """``a = MLP([p, g])`` with sigmoid hidden units; ``softmax_k(a_k)`` is the exit distribution."""

    def __init__(self, num_inputs: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_inputs, hidden), nn.Sigmoid(), nn.Linear(hidden, 1))

    def forward(self, probs: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([probs, g], 1)).squeeze(1)


class Scheduler(nn.Module):
    """Score and assignment heads of all ``K`` exits for ``C`` classes."""

    def __init__(self, num_exits: int, num_classes: int, hidden: int = 16) -> None:
        super().__init__()
        self.num_exits, self.num_classes = num_exits, num_classes
        self.score_heads = nn.ModuleList(ScoreHead(num_classes, k + 2, hidden) for k in range(num_exits))
        self.assign_heads = nn.ModuleList(
            AssignmentHead(num_classes + k + 2, max(1, (num_classes + k + 2) // 2)) for k in range(num_exits)
        )

    @staticmethod
    def confidences(max_score: torch.Tensor, entropy_conf: torch.Tensor, prev_scores: torch.Tensor) -> torch.Tensor:
        """``g = [m, e, q_0..q_{k-1}]``: ``[N, k + 2]`` float32."""
        return torch.cat([max_score[:, None], entropy_conf[:, None], prev_scores], 1)

    def forward(
        self, probs: torch.Tensor, max_score: torch.Tensor, entropy_conf: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All exits at once (training): ``probs [K, N, C]``, ``max_score, entropy_conf [K, N]``.

        Returns:
            ``q [K, N]`` scores and ``a [K, N]`` assignment logits.
        """
        scores, logits = [], []
        prev = probs.new_zeros(probs.shape[1], 0)
        for k in range(self.num_exits):
            g = self.confidences(max_score[k], entropy_conf[k], prev)
            q = self.score_heads[k](probs[k], g)
            scores.append(q)
            logits.append(self.assign_heads[k](probs[k], g))
            prev = torch.cat([prev, q[:, None]], 1)
        return torch.stack(scores), torch.stack(logits)


def scheduler_losses(
    q: torch.Tensor, a: torch.Tensor, correct: torch.Tensor, costs: torch.Tensor, budget: float
) -> dict[str, torch.Tensor]:
    """The three EENet losses for one batch: ``q, a, correct`` are ``[K, N]``, ``costs [K]``."""
    pi = torch.softmax(a, 0)  # [K, N]
    weights = pi.detach() / pi.detach().sum(1, keepdim=True).clamp_min(_EPS)
    q01 = q.clamp(_EPS, 1 - _EPS)
    bce = nn.functional.binary_cross_entropy(q01, correct, reduction="none")
    l_bce = (weights * bce).sum(1).mean()
    target = q01.detach() / q01.detach().sum(0, keepdim=True)
    l_kl = (target * (target.log() - torch.log_softmax(a, 0))).sum(0).mean()
    l_cost = ((pi * costs[:, None]).sum(0).mean() - budget).abs() / budget
    return {"bce": l_bce, "kl": l_kl, "cost": l_cost}


def _current_name(name: str) -> str:
    """A scheduler state-dict name as saved today; files from before the rename of the score heads'
    ReLU layer (``hidden`` -> ``mlp_in``, ``out`` -> ``mlp_out``) still load."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "score_heads":
        parts[2] = {"hidden": "mlp_in", "out": "mlp_out"}.get(parts[2], parts[2])
    return ".".join(parts)


class EENetPolicy(Policy):
    """The EENet scheduler as an exit policy.

    Args:
        hidden: width of the ReLU layer of each score head (0 for the release's linear head).
        epochs: training epochs over the validation outputs (phases alternate every ``phase_epochs``).
        phase_epochs: epochs per phase.
        batch_size: samples per step.
        lr: Adam learning rate of both phases.
        weight_decay: Adam (decoupled) weight decay.
        kl_weight, cost_weight: weights of ``L_kl`` and ``L_cost`` in the assignment phase.
        restarts: random exit-fraction restarts tried when setting thresholds.
        seed: makes training and restarts deterministic.
        progress: show a progress bar while training.
    """

    name = "eenet"

    def __init__(
        self,
        hidden: int = 16,
        epochs: int = 40,
        phase_epochs: int = 10,
        batch_size: int = 512,
        lr: float = 3e-3,
        weight_decay: float = 1e-2,
        kl_weight: float = 0.1,
        cost_weight: float = 1.0,
        restarts: int = 16,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        name = self.name
        self.hidden = options.integer(name, "hidden", hidden, 0)
        self.epochs = options.integer(name, "epochs", epochs, 0)
        self.phase_epochs = options.integer(name, "phase_epochs", phase_epochs, 1)
        self.batch_size = options.integer(name, "batch_size", batch_size, 1)
        self.lr = options.real(name, "lr", lr, positive=True)
        self.weight_decay = options.real(name, "weight_decay", weight_decay)
        self.kl_weight = options.real(name, "kl_weight", kl_weight)
        self.cost_weight = options.real(name, "cost_weight", cost_weight)
        self.restarts = options.integer(name, "restarts", restarts, 0)
        self.seed = options.seed(name, seed)
        self.progress = options.flag(name, "progress", progress)
        self.scheduler: Scheduler | None = None

    # ---------------------------------------------------- saving and loading
    def options(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "seed": self.seed}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"scheduler.{name}": t for name, t in self.scheduler.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        scheduler = Scheduler(self.thresholds.numel(), self.num_classes, self.hidden)
        prefix = "scheduler."
        unexpected = sorted(k for k in tensors if not k.startswith(prefix))
        if unexpected:
            raise PolicyError(f"eenet: unexpected tensors {', '.join(unexpected)} (the scheduler's are named scheduler.*)")
        try:
            scheduler.load_state_dict({_current_name(k[len(prefix):]): v for k, v in tensors.items()})
        except RuntimeError as error:  # missing or unexpected weights, or other shapes than hidden/exits/classes give
            raise PolicyError(f"eenet: the scheduler's weights do not fit its options and classes: {error}") from None
        self.scheduler = scheduler.requires_grad_(False).to(self.thresholds.device)
        self._score_heads_on = {}  # score() reads the heads' weights through this cache

    # -------------------------------------------------------------- scoring
    def score(self, k: int, features: ExitFeatures, history: ExitHistory) -> torch.Tensor:
        if self.scheduler is None:
            raise RuntimeError("the EENet policy is not fitted: call .fit(val, budget) first")
        g = Scheduler.confidences(features.max_score, features.entropy_conf, history.scores)
        # the head's weights as detached tensors on the features' device, built once per fit and
        # device: the ScoreHead's own arithmetic (head_score), without a module call at every exit
        head = self.score_head_on(k, g.device)
        return head_score(features.probs, g, head.class_weight, head.linear, head.mlp_weight, head.mlp_bias, head.mlp_out)

    def score_head(self, k: int) -> ScoreHeadParams:
        if self.scheduler is None:
            raise RuntimeError("the EENet policy is not fitted: call .fit(val, budget) first")
        head = self.scheduler.score_heads[k]
        mlp = head.mlp_in
        return ScoreHeadParams(
            head.class_weight.detach(),
            head.linear.detach(),
            None if mlp is None else mlp.weight.detach(),
            None if mlp is None else mlp.bias.detach(),
            None if mlp is None else head.mlp_out.detach(),
        )

    # -------------------------------------------------------------- fitting
    def _fit(self, val: ExitOutputs, budget: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.scheduler = Scheduler(val.num_exits, val.num_classes, self.hidden)
        self._train(val, budget, generator)
        return self._thresholds(val, budget, generator)

    def _train(self, val: ExitOutputs, budget: float, generator: torch.Generator) -> None:
        feats = val.features
        probs = torch.stack([f.probs for f in feats])
        max_score = torch.stack([f.max_score for f in feats])
        entropy_conf = torch.stack([f.entropy_conf for f in feats])
        correct = val.correct.float()
        costs = val.costs.float()
        sched = self.scheduler
        score_params = list(sched.score_heads.parameters())
        assign_params = list(sched.assign_heads.parameters())
        optimizers = [
            torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            for params in (score_params, assign_params)
        ]
        n = val.num_samples
        bar = tqdm(range(self.epochs), desc="eenet: training scheduler", disable=not self.progress, leave=False)
        for epoch in bar:
            phase = (epoch // self.phase_epochs) % 2  # 0: score heads on L_bce, 1: assignment heads
            optimizer = optimizers[phase]
            totals = {"bce": 0.0, "kl": 0.0, "cost": 0.0}
            perm = torch.randperm(n, generator=generator)
            for start in range(0, n, self.batch_size):
                idx = perm[start : start + self.batch_size]
                q, a = sched(probs[:, idx], max_score[:, idx], entropy_conf[:, idx])
                losses = scheduler_losses(q, a, correct[:, idx], costs, budget)
                loss = losses["bce"] if phase == 0 else self.kl_weight * losses["kl"] + self.cost_weight * losses["cost"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for key, value in losses.items():
                    totals[key] += float(value.detach()) * idx.numel() / n
            bar.set_postfix(bce=f"{totals['bce']:.3f}", cost=f"{totals['cost']:.3f}")

    def _thresholds(self, val: ExitOutputs, budget: float, generator: torch.Generator) -> torch.Tensor:
        feats = val.features
        with torch.no_grad():
            _, a = self.scheduler(
                torch.stack([f.probs for f in feats]),
                torch.stack([f.max_score for f in feats]),
                torch.stack([f.entropy_conf for f in feats]),
            )
        target = torch.softmax(a, 0).mean(1).double()  # the exit mix the assignment heads learned
        uniform = torch.full_like(target, 1.0 / val.num_exits)
        bases = [target, uniform, *random_bases(target, self.restarts, 1.0, generator)]
        thresholds, _ = best_over_bases(
            self.exit_scores(val), val.correct.float(), val.costs, budget, bases, levels=(0.5, 0.75, 1.0)
        )
        return thresholds
