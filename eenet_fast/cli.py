"""The ``eenet-fast`` command line.

A bad file, budget, path or option ends in one line ``error: ...`` on stderr and exit status 2
(:class:`~eenet_fast.errors.EENetError`, ``OSError``, a missing optional package; click's own usage
errors also exit with 2); ``eenet-fast --debug <command>`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from eenet_fast.errors import EENetError
from eenet_fast.evaluate import compare as compare_policies
from eenet_fast.evaluate import format_table
from eenet_fast.guarantee import ASSUMPTIONS
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies import POLICIES

CONFIDENCE_HELP = ("Certify each budget at this level (e.g. 0.95): the mean cost on new data stays within it with "
                   "this probability. Fits on half of the validation outputs, certifies on the other half.")


# Options that compare and report share.
VAL_OPTION = click.option("--val", "val_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                          help="Validation exit outputs (.npz with logits/probs, labels, costs; or the authors' .pt).")
TEST_OPTION = click.option("--test", "test_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                           help="Test exit outputs, same format.")
COSTS_OPTION = click.option("--costs", "costs_text", default=None,
                            help="Cumulative cost of each exit, comma-separated (overrides the files' costs).")
CONFIDENCE_OPTION = click.option("--confidence", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
                                 help=CONFIDENCE_HELP)

def _parse_costs(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(c) for c in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.25,0.5,1, got {text!r}") from None


BUDGET_HELP = ("an average cost per sample in the costs' unit, or a fraction of the full model's cost written "
               "'0.5x' or '50%'; comma-separated or repeated")


def _parse_budgets(texts: tuple[str, ...]) -> list[str]:
    """The budgets of every ``--budget`` option: each comma-separated or repeated (one syntax for every command)."""
    return [b.strip() for text in texts for b in text.split(",") if b.strip()]


def _parse_policies(names: tuple[str, ...]) -> list[str]:
    if not names or "all" in names:
        return list(POLICIES)
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise click.BadParameter(f"unknown policy {', '.join(unknown)}; choose from {', '.join(POLICIES)} or all")
    return list(dict.fromkeys(names))


SEED = click.IntRange(0, 2**32 - 1)


class _Commands(click.Group):
    """The command group: the errors of bad input print one line and exit with status 2."""

    def invoke(self, ctx: click.Context) -> None:
        try:
            return super().invoke(ctx)
        except (EENetError, OSError, ImportError) as error:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {' '.join(str(error).split())}", err=True)
            ctx.exit(2)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the traceback of an error instead of one line.")
@click.version_option(package_name="eenet-fast")
def main(debug: bool) -> None:
    """Adaptive early-exit inference: calibrate exit policies under a cost budget and run them."""


@main.command()
@VAL_OPTION
@TEST_OPTION
@click.option("--budget", "budgets", required=True, multiple=True, help=f"Budgets: {BUDGET_HELP}.")
@click.option("--policy", "policy_names", multiple=True,
              help=f"Policy to fit (repeat for several): {', '.join(POLICIES)}, or all (the default).")
@COSTS_OPTION
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the learned and searched policies.")
@CONFIDENCE_OPTION
@click.option("--json", "as_json", is_flag=True,
              help="Print only a JSON list of records (test and validation figures of every policy and budget).")
def compare(val_path: Path, test_path: Path, budgets: tuple[str, ...], policy_names: tuple[str, ...],
            costs_text: str | None, seed: int, confidence: float | None, as_json: bool) -> None:
    """Fit policies on validation outputs for each budget and compare them on test outputs."""
    costs = _parse_costs(costs_text)
    policies = _parse_policies(policy_names)
    val = ExitOutputs.load(val_path).with_costs(costs)
    test = ExitOutputs.load(test_path).with_costs(costs)
    rows = compare_policies(val, test, _parse_budgets(budgets), policies, seed=seed, progress=not as_json,
                            confidence=confidence)
    records = [row.record() for row in rows]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    click.echo(
        f"{val.num_exits} exits, {val.num_classes} classes; costs {', '.join(f'{c:.4g}' for c in val.costs.tolist())}; "
        f"{val.num_samples} validation / {test.num_samples} test samples"
    )
    if confidence is not None:
        click.echo(f"Budgets certified at {100 * confidence:.4g}% confidence: {ASSUMPTIONS}.")
    click.echo(format_table(records))


main.add_command(compare, name="evaluate")  # the command's name before 0.2, kept for scripts


@main.command()
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with the four Fashion-MNIST IDX files (default: the Debian package's).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("eenet_runs/demo"),
              show_default=True, help="Where the model, exit outputs, results and plot go (and are cached).")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="Training epochs of the multi-exit CNN.")
@click.option("--budget", "budgets", multiple=True, default=("0.3,0.4,0.5,0.7",), show_default=True,
              help=f"Budgets of the table, in the full model's FLOPs (1.0): {BUDGET_HELP}.")
@click.option("--speed-budget", default="0.5", show_default=True,
              help="Budget, in the full model's measured time (1.0 or '1x'), at which adaptive inference is timed.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--seed", type=SEED, default=0, show_default=True)
def demo(data: Path | None, out: Path, epochs: int, budgets: tuple[str, ...], speed_budget: str, threads: int | None,
         seed: int) -> None:
    """Train a multi-exit CNN on Fashion-MNIST, calibrate the policies and time real early exit."""
    from eenet_fast.demo import DemoConfig, run_demo

    cfg = DemoConfig(data=data, out=out, epochs=epochs, budgets=tuple(_parse_budgets(budgets)),
                     speed_budget=speed_budget, threads=threads, seed=seed)
    summary = run_demo(cfg, log=click.echo)
    click.echo(format_table(summary["records"]))
    s = summary["speed"]
    share = s["time_share"]
    pace = f"{s['speedup']:.2f}x faster" if share <= 1 else f"{share:.2f}x slower"
    click.echo(
        f"\nAdaptive inference (eenet, budget {s['budget']} of the full model's measured latency, batch {s['batch_size']}, "
        f"{s['threads']} thread{'s' if s['threads'] > 1 else ''}) over the 10,000 test images:\n"
        f"  full model {s['full_model_s']:.3f} s, adaptive {s['adaptive_s']:.3f} s (medians of {s['rounds']} interleaved "
        f"rounds); time share {share:.3f} (the rounds' median ratio, IQR {s['time_share_iqr']:.3f}; predicted "
        f"{s['predicted_time_share']:.3f}): {pace}\n"
        f"  accuracy {100 * s['accuracy_measured']:.2f}% (offline evaluation predicted "
        f"{100 * s['accuracy_predicted']:.2f}%; full model {100 * s['full_model_accuracy']:.2f}%), "
        f"exit mix {' / '.join(f'{100 * f:.1f}%' for f in s['exit_fractions'])}"
        + (f" ({s['exits_off_by_rounding']} sample(s) at a neighbouring exit: scores at a threshold, where the "
           "logits' last bits decide)" if s.get("exits_off_by_rounding") else "") + "\n"
        f"  smallest feasible time budget by batch size (every sample leaving at exit 1, measured in whole forwards): "
        f"{', '.join(f'{n}: {b:.2f}' for n, b in s['smallest_budget_by_batch'].items())}"
    )
    off = share / s["predicted_time_share"]
    if abs(off - 1) > 0.25:
        click.echo(f"  the time share served is {off:.2f}x the predicted one: another process "
                   "probably shared the CPU while timing or serving; run the demo again on a quiet machine")
    click.echo(f"\nResults in {out}/results.json" + (f", plots in {summary['plot']} and {summary['latency_plot']}"
               if summary["plot"] else " (pip install 'eenet-fast[report]' for the plots)"))


@main.command()
@VAL_OPTION
@TEST_OPTION
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the report (index.html, report.json, table.md, the figures): new, empty or "
                   "holding an earlier report, which is replaced when the new one is complete.")
@click.option("--budget", "--budgets", "budgets", multiple=True,
              help=f"Budgets: {BUDGET_HELP} (default: 8 budgets between the first and the last exit's cost).")
@click.option("--policy", "policy_names", multiple=True,
              help=f"Policy to report on (repeat for several): {', '.join(POLICIES)}, or all (the default).")
@COSTS_OPTION
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the learned policies and of the plotted samples.")
@CONFIDENCE_OPTION
def report(val_path: Path, test_path: Path, out: Path, budgets: tuple[str, ...], policy_names: tuple[str, ...],
           costs_text: str | None, seed: int, confidence: float | None) -> None:
    """Calibrate policies over a grid of budgets and write an HTML report of their decisions."""
    from eenet_fast.report import write_report

    costs = _parse_costs(costs_text)
    policies = _parse_policies(policy_names)
    budget_list = _parse_budgets(budgets) or None
    val = ExitOutputs.load(val_path).with_costs(costs)
    test = ExitOutputs.load(test_path).with_costs(costs)
    index = write_report(val, test, out, budgets=budget_list, policies=policies, seed=seed, confidence=confidence)
    click.echo(f"Report written to {index}")


@main.command()
@click.option("--model", "factory", required=True,
              help="The model factory, 'package.module:function' (importable on every node): it returns the model "
                   "(an EarlyExitModel or a model wrap() takes), or (model, example_batch).")
@click.option("--policy", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The policy file saved by model.save_policy().")
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP address (0.0.0.0 to serve other machines).")
@click.option("--port", default=8000, show_default=True, help="HTTP port.")
@click.option("--address", default=None, help="Join the Ray cluster at this address ('auto' on a cluster node); "
                                                "default: start Ray on this machine.")
@click.option("--replicas", default=1, show_default=True, help="Replicas (one engine each).")
@click.option("--num-cpus", default=1.0, show_default=True, help="CPUs per replica.")
@click.option("--num-gpus", default=0.0, show_default=True, help="GPUs per replica.")
@click.option("--threads", default=1, show_default=True, help="torch CPU threads per replica.")
@click.option("--max-batch", default=64, show_default=True, help="The most samples one engine step runs.")
@click.option("--max-wait-ms", default=5.0, show_default=True,
              help="How long rows wait in a stage's queue for a full batch before that stage is ready.")
def serve(factory: str, policy: Path, host: str, port: int, address: str | None, replicas: int, num_cpus: float,
          num_gpus: float, threads: int, max_batch: int, max_wait_ms: float) -> None:
    """Serve a model with its calibrated policy on Ray Serve: POST / {"inputs": [...]} (until Ctrl-C)."""
    try:
        from eenet_fast.serving import build_app, run_server

        app = build_app(factory, policy, replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus, threads=threads,
                        max_batch=max_batch, max_wait_ms=max_wait_ms)
    except (ImportError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"serving {factory} with {policy} on http://{host}:{port}/ (GET /health, GET /stats; Ctrl-C stops)")
    run_server(app, host=host, port=port, address=address)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
