"""Fast checks of factory.evaluate on small slices of the real finance splits."""
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the repo is not pip-installed; plain `pytest` does not add it
    sys.path.insert(0, str(ROOT))

from domains.finance.domain import DOMAIN  # noqa: E402
from factory import evaluate as ev  # noqa: E402

SPEC = DOMAIN.spec


def shuffled(frame: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame([frame[c].gather(rng.permutation(frame.height)) for c in frame.columns])


@pytest.fixture(scope="module")
def splits():
    return DOMAIN.load_split("train"), DOMAIN.load_split("val"), DOMAIN.load_split("test")


def test_quality_real_vs_real_is_high_and_shuffling_breaks_pair_trends(splits):
    _, val, test = splits
    real = ev.quality(test, val, SPEC)
    assert real["column_shapes"] > 0.9 and real["column_pair_trends"] > 0.9 and real["score"] > 0.9
    assert set(real["per_column_shape"]) == set(SPEC.names)
    shuf = ev.quality(test, shuffled(val), SPEC)
    assert shuf["column_shapes"] > 0.9  # marginals are kept exactly
    assert shuf["column_pair_trends"] < real["column_pair_trends"] - 0.1
    sub = ev.quality(test, val, SPEC, max_rows=300)
    assert sub["subsampled"] and sub["n_synth"] == 300 and sub["n_real"] == 300


def test_exact_copies_detects_planted_rows_and_their_dcr_is_zero(splits):
    train, val, _ = splits
    fresh = shuffled(val.head(400), seed=1)
    planted = train.sample(n=7, seed=3)
    synth = pl.concat([fresh, planted])
    assert ev.exact_copies(train, fresh, SPEC) == 0
    assert ev.exact_copies(train, synth, SPEC) == 7
    # a copy that differs in one cent of one column is not a copy any more
    nudged = planted.with_columns(pl.col("paid_interest") + 0.01)
    assert ev.exact_copies(train, nudged, SPEC) == 0

    d = ev.dcr(train, synth, SPEC)
    assert d.shape == (synth.height,)
    assert np.all(d[-7:] == 0)
    assert np.all(d[:-7] > 0)
    assert 0 < ev.dcr(train, nudged, SPEC).max() < 1e-3

    p = ev.privacy(train, synth, SPEC, reference=val.head(200))
    assert p["exact_copies"] == 7 and p["reference_exact_copies"] == 0
    assert p["dcr"]["p1"] == 0 and p["dcr_reference"]["median"] > 0


def test_rule_validity_of_real_and_of_broken_installments(splits):
    _, _, test = splits
    ok = ev.rule_validity(DOMAIN, test)
    assert ok["valid_rate"] == 1.0 and ok["schema_pass_rate"] == 1.0
    assert set(ok["rules"]) == {r.name for r in DOMAIN.rules}
    assert all(v == 1.0 for v in ok["rules"].values())

    broken = test.with_columns(
        pl.when(pl.int_range(pl.len()) < 10).then(pl.col("installment") + 1.0).otherwise(pl.col("installment"))
        .alias("installment"))
    bad = ev.rule_validity(DOMAIN, broken)
    assert bad["valid_rate"] == pytest.approx(1 - 10 / test.height)
    assert bad["rules"]["installment_matches_amortization"] == pytest.approx(1 - 10 / test.height)
    assert bad["rules"]["paid_total_is_sum"] == 1.0


def test_mle_keys_and_shuffled_training_data_scores_lower(splits):
    train, _, test = splits
    tr, te = train.head(1000), test.head(300)
    real = ev.mle(tr, te, DOMAIN, n_estimators=20, n_jobs=1)
    assert set(real) == {"interest_rate", "grade"}
    assert set(real["interest_rate"]) == {"r2"} and set(real["grade"]) == {"accuracy", "macro_f1"}
    assert real["interest_rate"]["r2"] > 0.5
    shuf = ev.mle(shuffled(tr), te, DOMAIN, n_estimators=20, n_jobs=1)
    assert shuf["interest_rate"]["r2"] < 0.2
    ratio = ev.mle_ratio(shuf, real)
    assert set(ratio) == {"interest_rate.r2", "grade.accuracy", "grade.macro_f1"}
    assert ratio["interest_rate.r2"] < 0.3
    # a candidate that lacks some grades entirely still trains and scores
    few = tr.filter(pl.col("grade").is_in(["A", "B"]))
    assert ev.mle(few, te, DOMAIN, n_estimators=10, n_jobs=1)["grade"]["accuracy"] < real["grade"]["accuracy"]


def test_evaluate_is_json_serializable(splits):
    train, val, test = splits
    out = ev.evaluate(DOMAIN, val.head(300), train.head(2000), test.head(300), n_estimators=10)
    text = json.dumps(out, allow_nan=False)
    assert set(json.loads(text)) >= {"rule_validity", "quality", "mle", "privacy", "n_rows"}
    assert out["rule_validity"]["valid_rate"] == 1.0
    assert set(out["mle"]["ratio"]) == {"interest_rate.r2", "grade.accuracy", "grade.macro_f1"}
