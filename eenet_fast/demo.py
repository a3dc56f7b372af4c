"""The demo: a multi-exit CNN on Fashion-MNIST, calibrated and run adaptively for real.

Steps (each cached in the output folder, so a second run takes seconds):

1. train :class:`~eenet_fast.zoo.MultiExitCNN` on the first 50,000 training images (``model.safetensors``);
2. collect the exit outputs of the last 10,000 training images (validation) and of the 10,000 test
   images (``val.npz``, ``test.npz``), with FLOP costs normalised so that the full model costs 1.0;
3. calibrate EENet and the baselines at each budget on validation and evaluate them on test;
4. install EENet at the speed budget, with costs measured as this machine's latency per exit (so
   the budget is a share of the full model's time), and time adaptive inference against the full
   model over the test set in interleaved rounds (:func:`eenet_fast.speed.measure_speed`), checking
   that it takes the exits the offline evaluation predicts;
5. write ``results.json``, the policy (``eenet_policy.safetensors``) and, with matplotlib, a plot.

The output folder and the budgets are checked before anything long starts; every file is written
whole or not at all (:func:`eenet_fast.files.write_atomic`).
"""

from __future__ import annotations

import io
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from eenet_fast.allocator import steady_allocator
from eenet_fast.datasets import load_fashion_mnist
from eenet_fast.evaluate import check_exits, compare, evaluate
from eenet_fast.files import write_atomic
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies import parse_budget
from eenet_fast.runtime import EarlyExitModel
from eenet_fast.speed import measure_speed
from eenet_fast.wrapping import wrap
from eenet_fast.threads import torch_threads
from eenet_fast.timing import LatencyModel, measure_floors, reach
from eenet_fast.training import fit_exits
from eenet_fast.zoo import MultiExitCNN

__all__ = ["DemoConfig", "DemoParts", "prepare_demo", "run_demo"]


@dataclass
class DemoConfig:
    """Settings of the demo; those marked (model) are part of the cached model's identity."""

    data: Path | None = None
    out: Path = Path("eenet_runs/demo")
    widths: tuple[int, ...] = (12, 32, 96)  # (model)
    head_grid: int = 4  # (model)
    epochs: int = 3  # (model)
    seed: int = 0  # (model)
    budgets: tuple[float | str, ...] = (0.3, 0.4, 0.5, 0.7)  # FLOPs, full model = 1.0 ("0.5x" works too)
    speed_budget: float | str = 0.5  # measured time, full model = 1.0
    batch_size: int = 256
    policies: tuple[str, ...] = ("eenet", "maxprob", "entropy", "patience", "search", "oracle")
    rounds: int = 5  # interleaved rounds of the full model and adaptive inference, timed
    threads: int | None = None
    progress: bool = True
    model_key: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.model_key = {
            "widths": list(self.widths), "epochs": self.epochs, "seed": self.seed, "head_grid": self.head_grid
        }


def _batches(x: torch.Tensor, y: torch.Tensor | None, size: int) -> list:
    return [(x[i : i + size], y[i : i + size]) if y is not None else x[i : i + size] for i in range(0, len(x), size)]


def _trained_model(cfg: DemoConfig, data: dict, log: Callable[[str], None]) -> MultiExitCNN:
    net = MultiExitCNN(widths=cfg.widths, head_grid=cfg.head_grid)
    path = cfg.out / "model.safetensors"
    key = json.dumps(cfg.model_key, sort_keys=True)
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            cached_key = (f.metadata() or {}).get("config")
        if cached_key == key:
            net.load_state_dict(load_file(str(path)))
            log(f"model: loaded the cached model from {path}")
            return net.eval()
    x, y = data["train"]
    torch.manual_seed(cfg.seed)
    order = torch.randperm(50_000)
    loader = [(x[idx], y[idx]) for idx in order.split(128)]
    log(f"model: training a {len(cfg.widths)}-exit CNN on 50,000 images for {cfg.epochs} epochs ...")
    start = time.perf_counter()
    fit_exits(net, loader, cfg.epochs, progress=cfg.progress, seed=cfg.seed)
    log(f"model: trained in {time.perf_counter() - start:.0f} s; cached in {path}")
    write_atomic(path, safetensors_bytes({k: v.contiguous() for k, v in net.state_dict().items()}, metadata={"config": key}))
    return net.eval()


def _outputs(model: EarlyExitModel, name: str, x: torch.Tensor, y: torch.Tensor, costs: list[float], cfg: DemoConfig) -> ExitOutputs:
    path = cfg.out / f"{name}.npz"
    if path.exists() and (cfg.out / "model.safetensors").stat().st_mtime <= path.stat().st_mtime:
        return ExitOutputs.load(path)
    outputs = model.collect(_batches(x, y, 1000), progress=cfg.progress, costs=costs)
    outputs.save(path)
    return outputs


@dataclass
class DemoParts:
    """The trained demo model and its cached exit outputs (FLOP costs, full model = 1.0)."""

    net: MultiExitCNN
    model: EarlyExitModel
    val: ExitOutputs
    test: ExitOutputs
    x_test: torch.Tensor
    y_test: torch.Tensor


def check_config(cfg: DemoConfig) -> None:
    """Fail at once, not after the training: every budget must be readable and the output folder
    writable (it is created with its parents).

    Raises:
        BudgetError: a budget cannot be read.
        OSError: the output folder cannot be created or written to (the message says which and why).
    """
    for budget in (*cfg.budgets, cfg.speed_budget):
        parse_budget(budget, 1.0)
    probe = cfg.out / f".write-test-{secrets.token_hex(4)}"
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as error:
        reason = f"{error.strerror or error} ({error.filename or cfg.out})"
        raise type(error)(f"cannot write the demo's results into {cfg.out}: {reason}; give --out a folder you can write to") from error


def prepare_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoParts:
    """Load the data, train (or load the cached) model and collect (or load) its exit outputs."""
    check_config(cfg)
    steady_allocator()  # the demo times its exits and serves in this process: keep freed CPU memory
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_fashion_mnist(cfg.data)
    net = _trained_model(cfg, data, log)
    model = wrap(net, backend="torch").eval()
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    costs = model.measure_costs("flops", x_test[:8])
    val = _outputs(model, "val", x_train[50_000:], y_train[50_000:], costs, cfg)
    test = _outputs(model, "test", x_test, y_test, costs, cfg)
    return DemoParts(net, model, val, test, x_test, y_test)


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole demo and return what it writes to ``results.json``."""
    parts = prepare_demo(cfg, log)
    net, model, val, test, x_test, y_test = parts.net, parts.model, parts.val, parts.test, parts.x_test, parts.y_test
    costs = test.costs.tolist()
    exit_acc = test.correct.double().mean(1).tolist()
    log("exits: " + ", ".join(f"exit {k + 1}: {100 * a:.2f}% at cost {c:.3f}" for k, (a, c) in enumerate(zip(exit_acc, costs))))

    records = [row.record() for row in compare(val, test, list(cfg.budgets), cfg.policies, seed=cfg.seed, progress=cfg.progress)]

    # The speed run budgets time, not FLOPs, at the batch size served: the exits are timed on batches
    # of 1, 2, 4, ..., batch_size and priced at the rows each stage sees (see eenet_fast.timing).
    policy = model.calibrate(
        val, cfg.speed_budget, policy="eenet", costs="latency", example=x_test[: cfg.batch_size], seed=cfg.seed, progress=False
    )
    # the smallest feasible budget at the smaller batch sizes, measured in whole forwards (the ladder's guess is noisy there)
    policy.latency = measure_floors(model, x_test[: cfg.batch_size], policy.latency, policy)
    latency = policy.costs.tolist()
    expected = evaluate(policy, test)
    batches = _batches(x_test, None, cfg.batch_size)

    def full() -> None:
        for b in batches:
            net(b)

    threads = min(policy.latency.threads, torch.get_num_threads())
    if threads < torch.get_num_threads():
        log(f"the machine was busy while timing, so the policy fits {threads} thread's time shares: serving on {threads}")
    with torch_threads(threads):  # served as timed: a policy fitted to one thread can overspend on more
        measured, results = measure_speed(lambda: [model(b) for b in batches], full, rounds=cfg.rounds)
    exits = torch.cat([r.exits for r in results])
    predictions = torch.cat([r.predictions for r in results])
    measured_accuracy = float((predictions == y_test).double().mean())
    rounding = check_exits(policy, test, exits)  # raises unless any difference is a score at its threshold
    speed = {
        "policy": "eenet",
        "budget": cfg.speed_budget,
        "costs": "latency",
        "latency_costs": latency,
        "batch_size": cfg.batch_size,
        "threads": threads,
        "full_model_s": measured.full_s,
        "adaptive_s": measured.adaptive_s,
        "time_share": measured.share,
        "time_share_iqr": measured.share_iqr,
        "rounds": measured.rounds,
        "speedup": measured.speedup,
        "accuracy_measured": measured_accuracy,
        "accuracy_predicted": expected.accuracy,
        "exits_off_by_rounding": rounding,
        "full_model_accuracy": exit_acc[-1],
        "exit_fractions": expected.exit_fractions,
        "avg_cost": expected.avg_cost,
        "predicted_time_share": policy.latency.predicted_fraction(reach(expected.exits, model.num_exits)),
        "smallest_budget_by_batch": {str(n): b for n, b in policy.latency.smallest_budgets().items()},
    }
    model.save_policy(cfg.out / "eenet_policy.safetensors")
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "costs": costs,
        "exit_accuracy": exit_acc,
        "records": records,
        "speed": speed,
    }
    write_atomic(cfg.out / "results.json", json.dumps(summary, indent=2))
    summary["plot"] = _plot(summary, cfg.out / "accuracy_vs_cost.png")
    summary["latency_plot"] = _plot_latency(policy.latency, float(policy.budget), cfg.out / "time_by_batch_size.png")
    return summary


def _plot_latency(latency: LatencyModel, budget: float, path: Path) -> Path | None:
    """The time model of the speed run: each exit's step and the full model against the batch size
    (left), and the smallest feasible time budget at each batch size against ``budget`` (right)."""

    def draw(axes: Any) -> None:
        ax, floors = axes
        sizes = list(latency.batch_sizes)
        ax.plot(sizes, [1e3 * t for t in latency.full_times.tolist()], marker="s", color="black", label="full model")
        for k in range(latency.num_exits):
            steps = [1e3 * latency.exit_time(k, n) for n in sizes]
            ax.plot(sizes, steps, marker="o", label=f"exit {k + 1}: stage, head, decision, compaction")
        ax.set_yscale("log")
        ax.set_ylabel("time (ms, best of the rounds)")
        ax.set_title(f"Time by batch size\n(corrections from whole forwards: exit 1 x{latency.first_factor:.2f}, "
                     f"later exits x{latency.correction:.2f})", fontsize=10)
        smallest = latency.smallest_budgets()
        floors.plot(sizes, [smallest[n] for n in sizes], marker="o", color="tab:red",
                    label="every sample leaving at exit 1 (" + ("measured in whole forwards" if latency.floors else
                                                                      f"measured at {latency.batch_size}, predicted elsewhere") + ")")
        floors.axhline(budget, color="tab:blue", linestyle="--", label=f"the budget ({budget:g})")
        floors.axhline(1.0, color="black", linestyle=":", label="the full model")
        floors.set_ylim(bottom=0)
        floors.set_ylabel("time / full model's time")
        floors.set_title("Smallest feasible time budget by batch size\n(below the budget: feasible there)", fontsize=10)
        for a in axes:
            a.set_xscale("log", base=2)
            a.set_xlabel("rows in the batch")
            a.grid(alpha=0.3, which="both")

    return _figure(path, draw, panels=2)


def _plot(summary: dict[str, Any], path: Path) -> Path | None:
    """Test accuracy against average cost for each policy, with the single exits marked."""

    def draw(ax: Any) -> None:
        for name in dict.fromkeys(r["policy"] for r in summary["records"]):
            rows = sorted((r for r in summary["records"] if r["policy"] == name), key=lambda r: r["avg_cost"])
            ax.plot([r["avg_cost"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=name,
                    linestyle="--" if name == "oracle" else "-")
        ax.scatter(summary["costs"], [100 * a for a in summary["exit_accuracy"]], color="black", marker="s",
                   zorder=5, label="single exits")
        ax.set_xlabel("average cost per sample (full model = 1)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Fashion-MNIST, multi-exit CNN: accuracy under a cost budget")
        ax.grid(alpha=0.3)

    return _figure(path, draw)


def _figure(path: Path, draw: Callable[[Any], None], panels: int = 1) -> Path | None:
    """``draw(ax)`` on new axes (a sequence of ``panels`` side by side when more than one), each
    with a legend, written as a PNG to ``path`` (``None`` without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(1, panels, figsize=(6.4 * panels, 4.2), dpi=120)
    draw(ax)
    for each in ax if panels > 1 else (ax,):
        each.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_atomic(path, png.getvalue())
    return path
