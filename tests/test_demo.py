"""The README's main job, end to end on real Fashion-MNIST (one short training epoch)."""

import json

import pytest
from click.testing import CliRunner

from eenet_fast.cli import main


@pytest.mark.slow
def test_demo_trains_calibrates_and_runs_adaptive_inference(tmp_path):
    args = ["demo", "--out", str(tmp_path), "--epochs", "1", "--budget", "0.4,0.6", "--speed-budget", "0.6"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "faster" in result.output and "| eenet" in result.output
    summary = json.loads((tmp_path / "results.json").read_text())
    speed = summary["speed"]
    assert speed["accuracy_measured"] == speed["accuracy_predicted"]  # real early exit == offline simulation
    assert {r["policy"] for r in summary["records"]} == {"eenet", "maxprob", "entropy", "patience", "search", "oracle"}
    for r in summary["records"]:
        assert r["val_avg_cost"] <= r["budget"] + 1e-9
    assert (tmp_path / "eenet_policy.safetensors").exists() and (tmp_path / "accuracy_vs_cost.png").exists()
    assert (tmp_path / "time_by_batch_size.png").exists() and 0 < speed["predicted_time_share"]
    assert speed["smallest_budget_by_batch"]["256"] <= float(speed["budget"])
    again = CliRunner().invoke(main, args)  # cached: no training the second time
    assert again.exit_code == 0 and "loaded the cached model" in again.output
