"""The run report as a reader sees it: rendered by real headless Chromium (Debian package `chromium`)
in an 800 px wide window. A probe script, added to a copy of the page, reads the laid-out page:
the verdict box, which gate rows are highlighted, and whether anything is wider than the window or
shrunk below its natural size (plot text is drawn at >= 10 px and must not be scaled down)."""
import json
import os
import re
import shutil
import subprocess

import pytest

from factory.baseline import MarginalBaseline
from factory.loop import run_generation
from factory.report import TICK_PT, build_report
from factory.store import Store

pytestmark = pytest.mark.slow
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=800,1200", "--virtual-time-budget=5000"]
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const failedRows = [...document.querySelectorAll('tr.failed')];
  const probe = {
    scrollWidth: document.documentElement.scrollWidth,
    verdict: document.getElementById('verdict').innerText,
    verdictBorder: getComputedStyle(document.getElementById('verdict')).borderTopColor,
    failedRows: failedRows.map(r => r.cells[0].innerText),
    failedBackground: failedRows.length ? getComputedStyle(failedRows[0].cells[0]).backgroundColor : null,
    images: imgs.length,
    shrunk: imgs.filter(i => i.naturalWidth > i.getBoundingClientRect().width + 1).length,
    wider: imgs.filter(i => i.getBoundingClientRect().right > 800).length,
    text: document.body.innerText,
  };
  const pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify(probe); document.body.appendChild(pre);
});</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs the Debian package")
        pytest.skip("headless Chromium not installed (apt-get install chromium); CI installs it")
    return found


def render(page, tmp_path) -> dict:
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    res = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, flags=re.S)
    assert found, res.stderr[-2000:]
    import html

    return json.loads(html.unescape(found.group(1)))


def test_gate_failed_report_reads_truthfully_at_800px(finance, tmp_path):
    # the marginal baseline breaks every correlation: the gate refuses it, --allow-drift is not given
    with Store(tmp_path / "f.duckdb") as store:
        run_id = run_generation(finance, MarginalBaseline.fit(finance), 300, 1, store, 2000,
                                progress=False).run_id
        assert store.run(run_id)["status"] == "gate_failed"
        records = store.records(finance, run_id)
        page = build_report(store, finance, run_id, records, tmp_path / "report")
        failed = store.frame("SELECT check_name FROM checks WHERE run_id = ? AND status = 'failed'",
                             [run_id])["check_name"].to_list()
    seen = render(page, tmp_path)
    assert seen["verdict"].startswith("Refused by the distribution gate")
    assert "stored, not exported" in seen["verdict"] and "records exported" not in seen["text"]
    assert seen["verdictBorder"] == "rgb(198, 40, 40)"  # the red box
    assert failed and sorted(seen["failedRows"]) == sorted(failed)  # every failed check, and only those
    assert seen["failedBackground"] == "rgb(253, 232, 232)"
    assert seen["scrollWidth"] <= 800, "the page is wider than an 800 px window"
    assert seen["images"] >= len(finance.spec.columns) + 3  # a plot per column, 3 heat-maps, rejections
    assert seen["shrunk"] == 0 and seen["wider"] == 0, "a plot is scaled down: its 10 px text gets smaller"
    assert TICK_PT >= 10
    for rule in finance.rules:  # the domain's rules, with their pass counts
        assert rule.name in seen["text"]
    assert "How to read the checks" in seen["text"] and "total-variation distance" in seen["text"]
