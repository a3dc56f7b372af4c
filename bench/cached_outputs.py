"""What the statistical benches share: the cached exit outputs they run on, and their markdown output."""

from __future__ import annotations

import sys
from pathlib import Path

from eenet_fast import ExitOutputs
from eenet_fast.synthetic import make_synthetic_outputs


def load_outputs(name: str) -> tuple[ExitOutputs, ExitOutputs]:
    """Validation and test outputs: ``"synthetic"`` (the tests' ``make_synthetic_outputs(4000, seed=1)``
    and ``seed=2``), ``"synthetic (class_skew 1.5)"`` (the same with class-dependent difficulty) or
    ``"fashion-mnist"`` (the demo's, ``eenet_runs/demo``; the model is trained on first use)."""
    if name.startswith("synthetic"):
        skew = 1.5 if "class_skew" in name else 0.0
        return (make_synthetic_outputs(4000, seed=1, class_skew=skew),
                make_synthetic_outputs(4000, seed=2, class_skew=skew))
    if name != "fashion-mnist":
        raise ValueError(f"unknown bench data {name!r}")
    from eenet_fast.demo import DemoConfig, prepare_demo

    parts = prepare_demo(DemoConfig(progress=False), log=lambda _: None)
    return parts.val, parts.test


def save_markdown(sections: list[str], path: Path | None, title: str) -> None:
    """With ``path``, write ``title``, the command that made it and the markdown sections there."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python", *sys.argv])
        path.write_text("\n".join([f"## {title}\n\n`{command}` (a shared 2-core CPU; these are statistics, not timings)\n",
                                   *sections]))
