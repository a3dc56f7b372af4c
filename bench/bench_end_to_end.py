"""End to end on the anchor CNN of ``shared/reference/gpu-anchors.md`` part 3: a 3-stage ResNet-style
CNN (widths 64/128/256, 4 basic blocks a stage, 32x32 inputs, bf16, channels-last, 100 classes)
where 50 % of the samples leave at exit 1, 30 % at exit 2 and 20 % run on.

Run: ``python -m pytest bench/bench_end_to_end.py``. Providers, timed in the same run:

* ``full``: the model's own forward (every stage, the last head);
* ``all_exits``: every stage and every head, no early exit (offline style);
* ``pytorch_compaction``: the hand-written early-exit loop (max-prob thresholds, boolean indexing);
* ``eenet_torch`` / ``eenet_triton``: ``EarlyExitModel.forward`` with the same thresholds on the
  torch backend and on the Triton backend (CUDA only).

On a GPU: batches 256 and 2048, times from CUDA events (median, see ``bench_kernels.cuda_time_us``).
On a CPU (a smoke run of the same code): widths 8/16/32, float32, batch 64, wall-clock, no Triton.
``extra_info`` holds ``speedup_vs_full`` (same run) and the exit mix.
"""

from __future__ import annotations

import pytest
import torch

from eenet_fast import make_policy, wrap
from eenet_fast.features import exit_features
from eenet_fast.policies.thresholds import assign_exits
from eenet_fast.zoo import ResNet

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
WIDTHS = (64, 128, 256) if ON_GPU else (8, 16, 32)
BATCHES = [256, 2048] if ON_GPU else [64]
MIX = (0.5, 0.3, 0.2)
_full: dict[int, float] = {}


def anchor_model():
    """The wrapped anchor CNN and a max-prob policy whose thresholds give :data:`MIX` on its inputs."""
    torch.manual_seed(0)
    net = ResNet(100, widths=WIDTHS, blocks=4, in_channels=3, stem_stride=1)
    net = net.to(DEVICE, DTYPE, memory_format=torch.channels_last).eval()
    model = wrap(net, backend="torch").eval()
    x = torch.randn(max(BATCHES), 3, 32, 32, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        scores = max_scores(model, x)
    running = torch.ones(x.shape[0], dtype=torch.bool, device=DEVICE)
    thresholds, left = [], 0.0
    for k in range(2):  # T_k leaves MIX[k] of all samples among those still running
        left += MIX[k]
        kept = scores[k][running]
        t = torch.quantile(kept.float(), 1 - MIX[k] / (1 - left + MIX[k])).item()
        thresholds.append(t)
        running &= scores[k] < t
    policy = make_policy("maxprob")
    policy.thresholds = torch.tensor([*thresholds, float("-inf")])
    policy.costs, policy.budget, policy.num_classes = torch.tensor([1.0, 2.0, 3.0]), 3.0, 100
    model.policy = policy
    return net, model, x


@pytest.fixture(scope="module")
def anchor():
    net, model, x = anchor_model()
    with torch.no_grad():  # warm every path up first: the first provider timed would pay for it
        for batch in BATCHES:
            for _ in range(3):
                net(x[:batch])
                handwritten(model, x[:batch], model.policy.thresholds.tolist())
                model(x[:batch])
    return net, model, x


def max_scores(model, x: torch.Tensor) -> torch.Tensor:
    """``[K, B]`` max softmax scores of every exit on ``x``, from one pass over every stage and head."""
    return torch.stack([exit_features(z).max_score for z in model.all_exits(x)])


def handwritten(model, x: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """The early-exit loop people write in PyTorch: boolean indexing after every exit."""
    out = torch.empty(x.shape[0], 100, device=x.device, dtype=x.dtype)
    ids = torch.arange(x.shape[0], device=x.device)
    state = x
    for k, (stage, head) in enumerate(zip(model.stages, model.heads)):
        state = stage(state)
        logits = head(state)
        leave = torch.softmax(logits.float(), -1).amax(-1) >= thresholds[k]
        out[ids[leave]] = logits[leave]
        state, ids = state[~leave], ids[~leave]
        if ids.numel() == 0:
            break
    return out


def timer(benchmark):
    if ON_GPU:
        from bench_kernels import cuda_time_us

        def run(fn):
            benchmark.extra_info["median_us_cuda_events"] = t = cuda_time_us(fn, flush_l2=False)
            benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)
            return t

        return run

    def run(fn):
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
        return benchmark.stats.stats.median

    return run


@pytest.mark.parametrize("provider", ["full", "all_exits", "pytorch_compaction", "eenet_torch", "eenet_triton"])
@pytest.mark.parametrize("batch", BATCHES)
def test_end_to_end(benchmark, anchor, batch, provider):
    net, model, x = anchor
    x = x[:batch]
    if provider == "eenet_triton" and not ON_GPU:
        pytest.skip("the triton backend is timed on CUDA only (its CPU interpreter is for tests)")
    model.backend = "triton" if provider == "eenet_triton" else "torch"
    thresholds = model.policy.thresholds.tolist()
    fns = {
        "full": lambda: net(x),
        "all_exits": lambda: model.all_exits(x),
        "pytorch_compaction": lambda: handwritten(model, x, thresholds),
        "eenet_torch": lambda: model(x),
        "eenet_triton": lambda: model(x),
    }
    benchmark.group = f"anchor CNN {WIDTHS} B={batch} {str(DTYPE).removeprefix('torch.')} on {DEVICE.type}"
    with torch.no_grad():
        seconds = timer(benchmark)(fns[provider])
        if provider == "full":
            _full[batch] = seconds
        if provider.startswith("eenet"):
            exits = model(x).exits
            benchmark.extra_info["exit_mix"] = mix = torch.bincount(exits, minlength=3).div(batch).tolist()
            # the thresholds give MIX on all the inputs, and each batch its own mix: its rows must take the
            # exits the thresholds give them offline (bf16 logits move in their last bits between batch sizes)
            offline = assign_exits(max_scores(model, x), model.policy.thresholds.to(x.device))
            differ = (exits != offline).float().mean().item()
            assert differ <= 0.01, f"{100 * differ:.1f} % of the rows left at another exit than offline (mix {mix})"
    benchmark.extra_info["speedup_vs_full"] = _full.get(batch, float("nan")) / seconds
