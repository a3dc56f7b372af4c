"""The report's page (eenet_fast/report/page.py): self-contained, with its captions and table, and
rendered in a real headless browser (skipped, with the reason, where Chromium is not installed)."""

import html
import json
import re
import shutil
import struct
import subprocess

import pytest

from eenet_fast.evaluate import format_table
from eenet_fast.report.page import render_page

FIGURES = ("accuracy_cost", "exit_mix", "decision_maps", "per_class")  # in page order


def test_self_contained_page(written_report):
    index, data = written_report.index, written_report.data
    out = index.parent
    assert index.name == "index.html"
    page = index.read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(FIGURES) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "set to their mean over the validation samples that reach exit k" in page  # the map's caption says so
    assert f"middle budget of the grid, {data['middle_budget']:.3g}" in page
    assert (out / "table.md").read_text() == format_table(data["records"]) + "\n"


def test_page_without_decision_maps_says_why(written_report):
    out = written_report.index.parent
    images = {name: (out / f"{name}.png").read_bytes() for name in FIGURES if name != "decision_maps"}
    page = render_page(written_report.data, images)
    assert len(re.findall(r'src="data:image/png;base64,', page)) == len(images)
    assert "EENet is not among the reported policies: no decision maps." in page


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
_CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(_CHROMIUM is None, reason="needs a headless Chromium: apt-get install -y chromium (.ci/run installs it)")
def test_page_renders_in_a_headless_browser(written_report, tmp_path):
    """Open the page (plus two probe scripts: error hooks first in <head>, an image check on load) in
    headless Chromium, read the probe's verdict from the dumped DOM and the browser's console log."""
    index = written_report.index
    page = index.read_text()
    assert page.count("<head>") == 1 and page.count("</body>") == 1
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>\n" + _HEAD_PROBE).replace("</body>", _LOAD_PROBE + "\n</body>"))
    command = [
        _CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
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
        width, height = struct.unpack(">II", (index.parent / f"{name}.png").read_bytes()[16:24])  # the PNG's header
        assert image["complete"] and (image["width"], image["height"]) == (width, height), image
