"""eenet_fast: adaptive early-exit inference that really stops.

The calibration side works on cached exit outputs (:class:`ExitOutputs`): policies
(:func:`make_policy`, EENet and the baselines) are fitted for an average-cost budget on validation
outputs and evaluated on test outputs (:func:`evaluate`, :func:`compare`). The runtime side,
:func:`wrap`, turns a multi-exit model into an :class:`EarlyExitModel` whose forward really stops.
"""

from eenet_fast.allocator import steady_allocator
from eenet_fast.batch import Shared
from eenet_fast.errors import BudgetError, EENetError, FileFormatError, InputError, PolicyError
from eenet_fast.evaluate import Evaluation, compare, evaluate
from eenet_fast.calibration import calibrate, collect
from eenet_fast.heads import TokenHead, conv_head, pooled_linear_head
from eenet_fast.features import ExitFeatures, exit_features
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies import POLICIES, Policy, make_policy
from eenet_fast.runtime import EarlyExitModel, ExitResult
from eenet_fast.speed import Speed, measure_speed
from eenet_fast.training import fit_exits
from eenet_fast.wrapping import wrap

__version__ = "0.1.0"

__all__ = [
    "ExitOutputs",
    "ExitFeatures",
    "exit_features",
    "Policy",
    "POLICIES",
    "make_policy",
    "Evaluation",
    "evaluate",
    "compare",
    "wrap",
    "pooled_linear_head",
    "EarlyExitModel",
    "ExitResult",
    "fit_exits",
    "calibrate",
    "collect",
    "conv_head",
    "TokenHead",
    "Shared",
    "EENetError",
    "InputError",
    "FileFormatError",
    "PolicyError",
    "BudgetError",
    "steady_allocator",
    "Speed",
    "measure_speed",
]
