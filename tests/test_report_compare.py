"""`factory report --compare PEERS.json`: the run side by side with peers scored by the same code.

Uses the toy domain (tests/domains/toy) and a small hand-written peers file, so it runs in seconds.
"""
import json

import pytest

from factory import evaluate as ev
from factory.store import Store
from helpers import assert_one_line_error, invoke


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    db = tmp_path_factory.mktemp("run") / "factory.duckdb"
    r = invoke("generate", "-d", "toy", "-n", 250, "--model", "baseline", "--db", db, "-q", "--allow-drift")
    assert r.exit_code == 0, r.output
    with Store(db, read_only=True) as s:
        return db, s.runs()["run_id"][0]


def peer(toy, **changes) -> dict:
    """A peer result as benchmarks/peers.py writes it, scored with the run's setup unless changed."""
    train, test = toy.load_split("train"), toy.load_split("test")
    setup = ev.setup(toy, train, test)
    setup.update(changes.pop("setup", {}))
    r = {"domain": "toy", "n_rows": 250, "note": "a fake peer", "setup": setup,
         "rule_validity": {"n": 250, "valid_rate": 0.125, "rules": {}},
         "quality": {"column_shapes": 0.5, "column_pair_trends": 0.25, "n_real": test.height, "subsampled": False},
         "mle": None,
         "privacy": {"exact_copies": 3, "dcr": {"median": 0.0123},
                     "dcr_reference": ev.privacy(train, test, toy.spec, reference=test)["dcr_reference"]}}
    r.update(changes)
    return r


@pytest.fixture
def peers_file(tmp_path, toy):
    f = tmp_path / "peers.json"
    f.write_text(json.dumps({
        "header": {"date": "2026-01-02T03:04:05+00:00", "git_commit": "abcdef1234567890", "command": "python -m x",
                   "config": {"quick": False}},
        "results": {"same_setup_peer": peer(toy),
                    "other_split_peer": peer(toy, n_rows=123, setup={"test": {"rows": 7, "sha256": "0000"}})}}))
    return f


def test_report_compare_puts_run_and_peers_side_by_side(toy_run, peers_file, tmp_path):
    db, run_id = toy_run
    r = invoke("report", run_id, "--db", db, "--out", tmp_path / "rep", "--compare", peers_file)
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "report.html").read_text()
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())

    comp = m["comparison"]
    assert comp["included"] is True
    assert comp["source"]["file"] == str(peers_file) and comp["source"]["date"] == "2026-01-02T03:04:05+00:00"
    assert comp["source"]["git_commit"] == "abcdef1234567890"
    run_row, same, other = comp["candidates"]
    assert run_id in run_row["note"] and same["candidate"] == "same_setup_peer" and other["candidate"] == "other_split_peer"
    # the run's row holds the run's own metrics; the peers' rows the file's numbers, unchanged
    assert run_row["scores"]["column_shapes"] == m["quality"]["column_shapes"]
    assert run_row["scores"]["valid_rate"] == m["rule_validity"]["valid_rate"] == 1.0
    assert same["scores"] == {"n_rows": 250, "valid_rate": 0.125, "column_shapes": 0.5, "column_pair_trends": 0.25,
                              "exact_copies": 3, "dcr_median": 0.0123}
    # same split, rules, code, settings, rows and real references: nothing flagged; otherwise named
    assert run_row["differences"] == [] and same["differences"] == []
    assert any(d.startswith("different test split") for d in other["differences"])
    assert "123 rows (run: 250)" in other["differences"]

    assert "Side by side with other generators" in page and "Not included" not in page
    for text in ("same_setup_peer", "other_split_peer", "a fake peer", "2026-01-02T03:04:05+00:00",
                 "abcdef1234", str(peers_file), "0.125", "0.0123", "different test split", "123 rows (run: 250)"):
        assert text in page, text
    assert page.count("data:image/png;base64,") >= 5 + 1 + 1  # columns + heat-maps + comparison chart
    assert "http://" not in page and "https://" not in page


def test_report_without_compare_says_the_comparison_is_not_included(toy_run, tmp_path):
    db, run_id = toy_run
    r = invoke("report", run_id, "--db", db, "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Side by side with other generators" in page and "Not included" in page and "--compare" in page
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["comparison"]["included"] is False


def test_report_compare_flags_a_different_metric_code_and_rule_set(toy_run, toy, tmp_path):
    db, run_id = toy_run
    f = tmp_path / "peers.json"
    f.write_text(json.dumps({"header": {}, "results": {
        "old": peer(toy, setup={"metric_code_sha256": "1111", "rule_set_hash": "2222"}),
        "no_setup": {k: v for k, v in peer(toy).items() if k != "setup"}}}))
    r = invoke("report", run_id, "--db", db, "--out", tmp_path / "rep", "--compare", f)
    assert r.exit_code == 0, r.output
    _, old, no_setup = json.loads((tmp_path / "rep" / "metrics.json").read_text())["comparison"]["candidates"]
    assert any(d.startswith("different metric code") for d in old["differences"])
    assert any(d.startswith("different rule set") for d in old["differences"])
    assert any(d.startswith("no setup recorded") for d in no_setup["differences"])


def test_report_compare_rejects_a_bad_or_foreign_peers_file(toy_run, toy, tmp_path):
    db, run_id = toy_run
    bad, foreign = tmp_path / "bad.json", tmp_path / "foreign.json"
    bad.write_text('{"results": []}')
    foreign.write_text(json.dumps({"results": {"x": peer(toy, domain="finance")}}))
    for f, fragment in ((tmp_path / "missing.json", "no such file"), (bad, "not a peers file"),
                        (foreign, "domain finance")):
        assert_one_line_error(invoke("report", run_id, "--db", db, "--out", tmp_path / "rep", "--compare", f), fragment)
