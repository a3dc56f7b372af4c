"""The README's main job, end to end on real Fashion-MNIST (one short training epoch)."""

import json

import pytest
from click.testing import CliRunner

from eenet_fast.cli import main
from eenet_fast.demo import DemoConfig, prepare_demo


@pytest.mark.slow
def test_demo_trains_calibrates_and_runs_adaptive_inference(tmp_path):
    args = ["demo", "--out", str(tmp_path), "--epochs", "1", "--budget", "0.4,0.6", "--speed-budget", "0.6"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert ("faster" in result.output or "slower" in result.output) and "| eenet" in result.output
    summary = json.loads((tmp_path / "results.json").read_text())
    speed = summary["speed"]
    assert speed["accuracy_measured"] == speed["accuracy_predicted"]  # real early exit == offline simulation
    assert {r["policy"] for r in summary["records"]} == {"eenet", "maxprob", "entropy", "patience", "search", "oracle"}
    for r in summary["records"]:
        assert r["val_avg_cost"] <= r["budget"] + 1e-9
    assert (tmp_path / "eenet_policy.safetensors").exists() and (tmp_path / "accuracy_vs_cost.png").exists()
    assert (tmp_path / "time_by_batch_size.png").exists() and 0 < speed["predicted_time_share"]
    assert speed["smallest_budget_by_batch"]["256"] <= float(speed["budget"])
    smallest = speed["smallest_budget_by_batch"]  # measured in whole forwards at every batch size of the ladder
    assert list(smallest) == [str(1 << i) for i in range(9)] and all(b > 0 for b in smallest.values())
    assert "measured in whole forwards" in result.output
    lines: list[str] = []  # cached: no training the second time (the same model settings, without a second speed run)
    prepare_demo(DemoConfig(out=tmp_path, epochs=1), log=lines.append)
    assert any("loaded the cached model" in line for line in lines)


@pytest.mark.parametrize("full_s, adaptive_s, words, hint", [(2.0, 1.0, "2.00x faster", False), (4.0, 5.9, "1.48x slower", True)])
def test_demo_says_slower_and_why_when_the_served_share_misses_the_prediction(monkeypatch, tmp_path, full_s, adaptive_s,
                                                                                 words, hint):
    speed = {"budget": "0.5", "batch_size": 256, "threads": 2, "full_model_s": full_s, "adaptive_s": adaptive_s,
             "speedup": full_s / adaptive_s, "time_share": adaptive_s / full_s, "time_share_iqr": 0.02, "rounds": 5,
             "predicted_time_share": 0.5, "accuracy_measured": 0.89,
             "accuracy_predicted": 0.89, "full_model_accuracy": 0.9, "exit_fractions": [0.7, 0.3],
             "smallest_budget_by_batch": {"256": 0.36}}
    monkeypatch.setattr("eenet_fast.demo.run_demo", lambda cfg, log: {"records": [], "speed": speed, "plot": None})
    monkeypatch.setattr("eenet_fast.cli.format_table", lambda records: "")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert words in result.output and ("another process" in result.output) == hint
