"""The HTML report: its numbers against evaluate(), its figures, and the page in a real headless browser."""

import html
import json
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from eenet_fast.cli import main
from eenet_fast.evaluate import format_table
from eenet_fast.evaluate import evaluate
from eenet_fast.features import ExitFeatures
from eenet_fast.policies import POLICIES, ExitHistory, make_policy
from eenet_fast.report import INSTALL_HINT, MAX_POINTS, default_budgets, write_report
from eenet_fast.synthetic import make_synthetic_outputs

BUDGETS = [0.4, "60%", 0.8]  # costs are 0.25, 0.5, 0.75, 1
FAST = {"eenet": {"epochs": 10}}
FIGURES = ("accuracy_cost", "exit_mix", "decision_maps", "per_class")


@pytest.fixture(scope="module")
def outputs():
    return make_synthetic_outputs(1500, seed=1), make_synthetic_outputs(1500, seed=2)


@pytest.fixture(scope="module")
def report(outputs, tmp_path_factory):
    val, test = outputs
    out = tmp_path_factory.mktemp("report")
    index = write_report(val, test, out, budgets=BUDGETS, seed=3, progress=False, policy_options=FAST)
    return index, json.loads((out / "report.json").read_text())


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_files_and_self_contained_page(report):
    index, data = report
    out = index.parent
    assert index.name == "index.html"
    page = index.read_text()
    for name in FIGURES:
        width, height = png_size((out / f"{name}.png").read_bytes())
        assert width >= 600 and height >= 300
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(FIGURES) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "set to their mean over the validation samples that reach exit k" in page  # the map's caption says so
    assert f"middle budget of the grid, {data['middle_budget']:.3g}" in page
    assert (out / "table.md").read_text() == format_table(data["records"]) + "\n"


def test_numbers_match_evaluate(report, outputs):
    _, data = report
    val, test = outputs
    assert data["budgets"] == [0.4, 0.6, 0.8] and data["middle_budget"] == 0.6
    assert [(r["policy"], r["budget"]) for r in data["records"]] == [(p, b) for p in POLICIES for b in data["budgets"]]
    for name in ("eenet", "maxprob", "oracle"):
        options = {"seed": 3, "progress": False, **FAST.get(name, {})} if name == "eenet" else {}
        policy = make_policy(name, **options).fit(val, 0.6)
        record = next(r for r in data["records"] if r["policy"] == name and r["budget"] == 0.6)
        on_test, on_val = evaluate(policy, test), evaluate(policy, val)
        assert record["accuracy"] == on_test.accuracy and record["avg_cost"] == on_test.avg_cost
        assert record["exit_fractions"] == on_test.exit_fractions
        assert record["val_accuracy"] == on_val.accuracy and record["val_avg_cost"] == on_val.avg_cost
        assert record["val_exit_fractions"] == on_val.exit_fractions
        assert record["val_avg_cost"] <= 0.6 + 1e-9
    exits = data["single_exits"]
    assert exits["cost"] == val.costs.tolist()
    assert exits["test_accuracy"] == pytest.approx(test.correct.double().mean(1).tolist())
    assert exits["val_accuracy"] == pytest.approx(val.correct.double().mean(1).tolist())


def test_recommendation_is_best_deployable_on_validation(report):
    _, data = report
    assert [r["budget"] for r in data["recommendations"]] == data["budgets"]
    for rec in data["recommendations"]:
        rows = [r for r in data["records"] if r["budget"] == rec["budget"] and r["policy"] != "oracle"]
        assert rec["policy"] != "oracle"
        assert rec["val_accuracy"] == max(r["val_accuracy"] for r in rows)
        chosen = next(r for r in rows if r["policy"] == rec["policy"])
        assert rec["accuracy"] == chosen["accuracy"]


def test_decision_maps_follow_the_fitted_policy(report, outputs):
    _, data = report
    val, _ = outputs
    maps = data["decision_maps"]
    assert maps["policy"] == "eenet" and maps["budget"] == data["middle_budget"]
    policy = make_policy("eenet", seed=3, progress=False, **FAST["eenet"]).fit(val, 0.6)
    scores = policy.exit_scores(val)
    exits = policy.assign(val)
    assert [m["exit"] for m in maps["exits"]] == list(range(val.num_exits - 1))
    for row in maps["exits"]:
        k = row["exit"]
        grid_size = len(row["max_score_axis"])
        reach = exits >= k
        m_axis, e_axis = torch.tensor(row["max_score_axis"]), torch.tensor(row["entropy_conf_axis"])
        m, e = val.features[k].max_score[reach], val.features[k].entropy_conf[reach]
        tol = 1e-6  # the axes are rounded to 6 decimals
        assert 1 / val.num_classes - tol <= m_axis[0] <= m.min() + tol and m.max() - tol <= m_axis[-1] <= 1 + tol
        assert -tol <= e_axis[0] <= e.min() + tol and e.max() - tol <= e_axis[-1] <= 1 + tol
        threshold = float(row["threshold"])
        assert threshold == pytest.approx(float(policy.thresholds[k]))
        assert row["val_reaching"] == int((exits >= k).sum()) and row["val_leaving"] == int((exits == k).sum())
        mean_probs = val.features[k].probs[reach].mean(0)
        mean_earlier = scores[:k, reach].mean(1)
        assert row["mean_probs"] == pytest.approx(mean_probs.tolist(), abs=1e-5)
        assert row["mean_earlier_scores"] == pytest.approx(mean_earlier.tolist(), abs=1e-5)
        grid = torch.tensor(row["score_grid"])  # rows: entropy confidence, columns: max score
        assert grid.shape == (grid_size, grid_size)
        for i, j in [(0, 0), (grid_size // 2, grid_size - 1), (grid_size - 1, grid_size // 3)]:
            m, e = row["max_score_axis"][j], row["entropy_conf_axis"][i]
            feats = ExitFeatures(mean_probs[None], torch.tensor([m]), torch.tensor([e]), torch.zeros(1, dtype=torch.long))
            q = policy.score(k, feats, ExitHistory(mean_earlier[None], torch.zeros(1, k, dtype=torch.long)))
            assert float(grid[i, j]) == pytest.approx(float(q), abs=1e-4)
        pts = row["points"]
        assert len(pts["score"]) == min(row["val_reaching"], MAX_POINTS)
        for score, leaves in zip(pts["score"], pts["leaves"]):  # the real decision is the actual score vs T_k
            assert leaves == (score >= threshold) or abs(score - threshold) < 1e-4


def test_per_class_view_adds_up(report, outputs):
    _, data = report
    _, test = outputs
    per_class = data["per_class"]
    assert per_class["policy"] == "eenet" and per_class["budget"] == data["middle_budget"]
    fractions = torch.tensor(per_class["exit_fractions"], dtype=torch.float64)  # [C, K]
    counts = torch.tensor(per_class["counts"], dtype=torch.float64)
    assert counts.sum() == test.num_samples
    assert torch.allclose(fractions.sum(1), torch.ones(test.num_classes, dtype=torch.float64), atol=1e-5)
    record = next(r for r in data["records"] if r["policy"] == "eenet" and r["budget"] == data["middle_budget"])
    overall = (fractions * counts[:, None]).sum(0) / counts.sum()
    assert overall.tolist() == pytest.approx(record["exit_fractions"], abs=1e-5)
    accuracy = sum(a * n for a, n in zip(per_class["accuracy"], per_class["counts"])) / counts.sum()
    assert float(accuracy) == pytest.approx(record["accuracy"], abs=1e-5)


def test_default_budgets_lie_between_first_and_last_exit():
    costs = torch.tensor([0.1, 0.4, 1.0], dtype=torch.float64)
    budgets = default_budgets(costs)
    assert len(budgets) == 8 and budgets == sorted(budgets)
    assert 0.1 < budgets[0] and budgets[-1] < 1.0


def test_without_matplotlib_says_how_to_install(outputs, tmp_path, monkeypatch):
    val, test = outputs
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=re.escape(INSTALL_HINT)):
        write_report(val, test, tmp_path, budgets=[0.5], policies=["maxprob"], progress=False)
    val.save(tmp_path / "val.npz")
    test.save(tmp_path / "test.npz")
    result = CliRunner().invoke(main, ["report", "--val", str(tmp_path / "val.npz"), "--test", str(tmp_path / "test.npz"),
                                       "--policy", "maxprob", "--budgets", "0.5", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and INSTALL_HINT in result.output
    assert not (tmp_path / "r").exists()


def test_cli_report(outputs, tmp_path):
    val, test = outputs
    val.save(tmp_path / "val.npz")
    test.save(tmp_path / "test.npz")
    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["report", "--val", str(tmp_path / "val.npz"), "--test", str(tmp_path / "test.npz"),
                                       "--policy", "maxprob", "--policy", "entropy", "--budgets", "0.4,0.5x",
                                       "--budget", "0.7", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out / "index.html") in result.output
    data = json.loads((out / "report.json").read_text())
    assert data["budgets"] == [0.4, 0.5, 0.7] and data["decision_maps"] is None
    assert data["per_class"]["policy"] == "maxprob"
    assert {p.name for p in out.iterdir()} == {"index.html", "report.json", "table.md", "accuracy_cost.png",
                                                "exit_mix.png", "per_class.png"}
    assert "no decision maps" in (out / "index.html").read_text()
    bad = CliRunner().invoke(main, ["report", "--val", str(tmp_path / "val.npz"), "--test", str(tmp_path / "test.npz"),
                                    "--policy", "maxprob", "--budgets", "0.1", "--out", str(out)])
    assert bad.exit_code != 0 and "below the cost of the first exit" in bad.output


# ------------------------------------------------------------------------------------ in a browser
_HEAD_PROBE = """<script>
window.__reportErrors = [];
window.addEventListener("error", e => window.__reportErrors.push(
  e.message || ("failed to load " + (e.target && (e.target.alt || e.target.tagName)))), true);
window.addEventListener("unhandledrejection", e => window.__reportErrors.push(String(e.reason)));
for (const level of ["error", "warn"]) {
  const original = console[level];
  console[level] = (...args) => { window.__reportErrors.push(level + ": " + args.join(" ")); original.apply(console, args); };
}
</script>"""
_LOAD_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images, img => ({alt: img.alt, complete: img.complete,
                                                      width: img.naturalWidth, height: img.naturalHeight}));
  const pre = document.createElement("pre");
  pre.id = "report-check";
  pre.textContent = JSON.stringify({images: images, errors: window.__reportErrors});
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("this test opens the report in a headless Chromium, which is not installed: apt-get install -y chromium")


def test_page_renders_in_a_headless_browser(report, tmp_path):
    """Open the page (plus two probe scripts: error hooks first in <head>, an image check on load) in
    headless Chromium, read the probe's verdict from the dumped DOM and the browser's console log."""
    index, _ = report
    page = index.read_text()
    assert page.count("<head>") == 1 and page.count("</body>") == 1
    probed = index.with_name("probed.html")
    probed.write_text(page.replace("<head>", "<head>\n" + _HEAD_PROBE).replace("</body>", _LOAD_PROBE + "\n</body>"))
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr", "--v=0", "--dump-dom", probed.as_uri(),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    log = "\n".join(line for line in run.stderr.splitlines() if "dbus" not in line)
    found = re.search(r'<pre id="report-check">(.*?)</pre>', run.stdout, re.S)
    assert run.returncode == 0 and found, f"chromium failed (exit {run.returncode}):\n{log[-3000:]}"
    check = json.loads(html.unescape(found.group(1)))
    assert check["errors"] == []
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log  # any console message from the page
    images = check["images"]
    assert len(images) == len(FIGURES)
    for image, name in zip(images, FIGURES):
        width, height = png_size((index.parent / f"{name}.png").read_bytes())
        assert image["complete"] and (image["width"], image["height"]) == (width, height), image
