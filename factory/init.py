"""`factory init NAME --from FILE`: a user's table -> a declarative domain folder.

    domains/NAME/
      domain.toml   columns (inferred), rules (mined), settings (training budget, MLE tasks,
                    calibrated gate and privacy thresholds): review and edit it
      data/         train/val/test Parquet splits (seeded 80/10/10 permutation) + splits.json
      DATA.md       source, rows, columns kept and excluded (and why), split sizes and sha256
      RULES.md      every rule with its support and its pass rate on each split

Steps: read (CSV or Parquet) -> infer a type per column (ID-like, free-text, date and all-null
columns are flagged and excluded) -> split -> mine rules on the train split
(factory.mining.mine) and keep those that also hold on every val and test row -> columns a
kept rule fully determines become derived -> the other rules become decode constraints where
the schema tokenizer can enforce them -> calibrate the gate on the real splits
(factory.checks.calibrate) -> write everything to a temporary folder and rename it into place,
so a failure leaves nothing half-written.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from factory.domain_file import DOMAIN_FILE, SPLITS, build_domain, nulls_to_toml
from schemas.columns import NULL_TEXT, Categorical, TableSpec

SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MIN_ROWS = 20  # fewer rows cannot be split 80/10/10 with at least one row in val and test
MAX_CATEGORIES = 100  # a string column with more distinct values is free text, not a category
MAX_DECIMALS = 4  # finer numbers are rounded to this many decimals (DATA.md says which)
ROUND_SHARE = 0.001  # up to this share of a column's values may be rounded to its inferred decimals
NULL_VALUES = ["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None"]
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
DEFAULT_BUDGET_MINUTES = 20.0


class InitError(ValueError):
    """A user mistake or an unusable table: one line, exit 2."""


@dataclass
class Inferred:
    """What type inference made of the source table."""

    frame: pl.DataFrame  # kept columns, cleaned and cast to their spec dtypes
    columns: list[dict]  # [[columns]] entries of domain.toml
    excluded: list[dict]  # {name, reason}
    notes: list[str] = field(default_factory=list)  # changes made to values (DATA.md)
    renamed: dict = field(default_factory=dict)  # source name -> column name


# ---------------------------------------------------------------- reading and inference

def read_source(path: Path) -> pl.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InitError(f"--from {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pl.read_parquet(path)
        elif suffix in (".csv", ".tsv"):
            df = pl.read_csv(path, separator="\t" if suffix == ".tsv" else ",", infer_schema_length=None,
                             null_values=NULL_VALUES, try_parse_dates=False)
        else:
            raise InitError(f"--from {path}: unknown extension {path.suffix!r}; expected .csv or .parquet")
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, InitError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InitError(f"--from {path}: cannot parse it as {suffix[1:].upper()}: {first}") from None
    if df.width == 0 or df.height == 0:
        raise InitError(f"--from {path}: the table is empty ({df.height} rows, {df.width} columns)")
    if df.height < MIN_ROWS:
        raise InitError(f"--from {path}: the table has {df.height} row{'s' if df.height != 1 else ''}; "
                        f"init needs at least {MIN_ROWS} to split it into train/val/test")
    return df


def _clean_name(name: str, taken: set) -> str:
    out = re.sub(r"[^A-Za-z0-9_]", "_", name.strip()) or "column"
    if out[0].isdigit():
        out = "c_" + out
    base, k = out, 2
    while out in taken:
        out, k = f"{base}_{k}", k + 1
    return out


def _decimals(s: pl.Series) -> tuple[int, int]:
    """(decimals, values it rounds): the fewest decimals (<= MAX_DECIMALS) that write all but at
    most ROUND_SHARE of a float series' values exactly. One stray 0.92248062 among values with 1-3
    decimals should not make the model write 8 digits for every row."""
    v = s.drop_nulls().to_numpy()
    for k in range(MAX_DECIMALS + 1):
        off = int(np.sum(np.abs(v - np.round(v, k)) > 1e-9 * np.maximum(1.0, np.abs(v))))
        if off <= ROUND_SHARE * len(v):
            return k, off
    return MAX_DECIMALS, int(np.sum(np.abs(v - np.round(v, MAX_DECIMALS)) > 1e-9 * np.maximum(1.0, np.abs(v))))


def _looks_like_dates(s: pl.Series) -> bool:
    sample = s.drop_nulls().head(200)
    if sample.len() == 0 or not sample.str.contains(r"^\d{4}-\d{2}-\d{2}|^\d{1,2}/\d{1,2}/\d{2,4}").all():
        return False
    for conv in (lambda x: x.str.to_datetime(strict=False), lambda x: x.str.to_date(strict=False)):
        try:
            if conv(sample).null_count() == 0:
                return True
        except pl.exceptions.PolarsError:
            continue
    return False


def _looks_like_text(s: pl.Series) -> bool:
    """Words rather than codes: most values hold a space, or they average 20+ characters."""
    v = s.drop_nulls()
    return bool(v.str.contains(" ", literal=True).mean() >= 0.5 or v.str.len_chars().mean() >= 20)


def infer(df: pl.DataFrame, warn: Callable[[str], None] = lambda m: None) -> Inferred:
    """One domain column per usable source column. Excluded (and flagged): all-null, ID-like
    (a distinct value in every row), dates, free text (strings with more than MAX_CATEGORIES
    distinct values, or distinct in over half the rows), and columns of other kinds (lists, ...)."""
    cols, excluded, out, notes, renamed = [], [], [], [], {}
    taken: set = set()
    n = df.height

    def exclude(name, reason):
        excluded.append({"name": name, "reason": reason})
        warn(f"column {name!r} excluded: {reason}")

    for src in df.columns:
        s = df[src]
        if s.dtype.is_float():
            s = s.fill_nan(None)
            if s.is_infinite().any():
                notes.append(f"{src}: {int(s.is_infinite().sum())} infinite values read as null")
                s = pl.select(pl.when(s.is_infinite()).then(None).otherwise(s)).to_series().alias(src)
        nonnull = n - s.null_count()
        if nonnull == 0:
            exclude(src, "every value is null")
            continue
        distinct = s.drop_nulls().n_unique()
        entry: dict = {}
        dtype = s.dtype
        if dtype in (pl.Date, pl.Datetime, pl.Time, pl.Duration) or isinstance(dtype, (pl.Datetime, pl.Duration)):
            exclude(src, f"a date/time column ({dtype}); dates are not generated yet")
            continue
        if dtype == pl.Boolean:
            s = s.cast(pl.String)
            dtype = pl.String
        if dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum):
            s = s.cast(pl.String)
            if (s == NULL_TEXT).any():  # the record text writes a missing value as "null"
                notes.append(f"{src}: the text {NULL_TEXT!r} read as a missing value")
                s = pl.select(pl.when(s == NULL_TEXT).then(None).otherwise(s)).to_series().alias(src)
                nonnull, distinct = n - s.null_count(), s.drop_nulls().n_unique()
                if nonnull == 0:
                    exclude(src, "every value is null")
                    continue
            if _looks_like_dates(s):
                exclude(src, "holds dates (as text); dates are not generated yet")
                continue
            many = distinct > MAX_CATEGORIES or distinct > 0.5 * nonnull
            if many and _looks_like_text(s):
                exclude(src, f"free text: {distinct:,} distinct strings, mostly words (a category has at most "
                             f"{MAX_CATEGORIES} values)")
                continue
            if distinct == nonnull and nonnull > 1:
                exclude(src, "ID-like: a distinct value in every row")
                continue
            if many:
                exclude(src, f"free text or codes: {distinct:,} distinct strings (a category has at most "
                             f"{MAX_CATEGORIES} values)")
                continue
            fixed = s.str.replace_all(", ", ",", literal=True).str.replace_all(": ", ":", literal=True)
            if (fixed != s).any():
                notes.append(f"{src}: ', ' and ': ' inside values written as ',' and ':' (the record text uses them)")
                s = fixed
            values = sorted(s.drop_nulls().unique().to_list())
            entry = {"type": "category", "values": values}
        elif dtype.is_integer() or dtype.is_float():
            if dtype.is_float():
                k, off = _decimals(s)
                top = float(s.abs().max())
                while k and top * 10**k >= 1e15:  # the tokenizer writes value x 10^decimals as an int64
                    k -= 1
                    off = int((s.drop_nulls() != s.drop_nulls().round(k)).sum())
                if off:
                    notes.append(f"{src}: {off:,} value{'s' if off > 1 else ''} rounded to {k} decimals")
                s = s.round(k) if k else s.round(0).cast(pl.Int64)
            else:
                s = s.cast(pl.Int64)
                k = 0
            if k == 0 and distinct == nonnull == n and n > 1:
                exclude(src, "ID-like: a distinct integer in every row")
                continue
            if k == 0 and distinct <= 2:
                entry = {"type": "category", "values": sorted(int(v) for v in s.drop_nulls().unique().to_list())}
            else:
                lo, hi = s.min(), s.max()
                entry = {"type": "integer" if k == 0 else "decimal",
                         "lo": int(lo) if k == 0 else float(lo), "hi": int(hi) if k == 0 else float(hi)}
                if k:
                    entry["decimals"] = k
        else:
            exclude(src, f"unsupported type {dtype}")
            continue
        name = _clean_name(src, taken)
        taken.add(name)
        if name != src:
            renamed[src] = name
        cols.append({"name": name, **entry, "nullable": bool(s.null_count() > 0)})
        out.append(s.alias(name))
    if not cols:
        raise InitError("no usable column: every column was excluded (" +
                        "; ".join(f"{e['name']}: {e['reason']}" for e in excluded) + ")")
    # Generation order (= the record's column order): categories first, then numbers, each in source
    # order. Mined conditions are on categories, and the decoder can only enforce a relation on a
    # column written after the ones it reads ("colour = red implies size <= 3", "x null when kind is b").
    order = sorted(range(len(cols)), key=lambda k: cols[k]["type"] != "category")
    cols, out = [cols[k] for k in order], [out[k] for k in order]
    return Inferred(pl.DataFrame(out), cols, excluded, notes, renamed)


def split(df: pl.DataFrame, seed: int = SPLIT_SEED) -> dict[str, pl.DataFrame]:
    """Seeded permutation 80/10/10; each split keeps the source row order."""
    order = np.random.default_rng(seed).permutation(df.height)
    n_train = int(SPLIT_FRACTIONS[0] * df.height)
    n_val = int(SPLIT_FRACTIONS[1] * df.height)
    idx = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {k: df[np.sort(v)] for k, v in idx.items()}


# ---------------------------------------------------------------- rules

def _pass_rate(expr: pl.Expr, frame: pl.DataFrame) -> float:
    if frame.height == 0:
        return 1.0
    return float(frame.select(expr.fill_null(False).cast(pl.Float64).mean()).item())


def mine_rules(train: pl.DataFrame, spec: TableSpec, seed: int = 0) -> list:
    from factory.mining import mine

    return list(mine(train, spec, seed=seed))


def choose_rules(mined: list, spec: TableSpec, splits: dict[str, pl.DataFrame]):
    """Keep the mined rules that hold on every row of every split; pick the columns they derive.

    Returns (kept [(mined, pass rates)], dropped [(mined, pass rates)], derived {column: rule name}).
    Which kept rules derive a column is factory.mining.derived_columns' choice: the first rule per
    column, never a cycle of derivations (a derived column may read one derived before it)."""
    from factory.mining import derived_columns

    kept, dropped = [], []
    for m in mined:
        rule = m.constraint.rule()
        rates = {s: _pass_rate(rule.expr, f) for s, f in splits.items()}
        (kept if min(rates.values()) == 1.0 else dropped).append((m, rates))
    chosen = derived_columns([m for m, _ in kept])
    by_constraint = {id(m.constraint): m.name for m, _ in kept}
    derived = {col: by_constraint[id(c)] for col, c in chosen.items()}
    return kept, dropped, derived


def _decodable(constraint, spec: TableSpec) -> bool:
    """Can the schema tokenizer enforce this constraint at decode time (its kind and the columns'
    generation order)? Otherwise it stays a rule only."""
    from factory.difflm.tokenizer import enforceable

    masked, _ = enforceable([constraint], spec, spec.generated_names)
    return bool(masked)


# ---------------------------------------------------------------- writing

def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _toml(doc: dict, header: str) -> str:
    import tomli_w

    return header + tomli_w.dumps(doc, multiline_strings=False)


HEADER = """\
# Domain {name!r}, written by `factory init` from {source} on {date}.
# Review it, then edit freely; `factory domains` shows what the engine reads.
# - [[columns]]: type integer | decimal | category; lo/hi (the schema range), decimals, values,
#   nullable; derived = true: computed by the rule that determines it, never generated.
# - [[rules]]: each constraint is checked on every record; decode = true also masks the decoder
#   with it; delete a rule you do not want (and set its derived column to derived = false).
# - [settings]: training budget ([settings.train] max_minutes), MLE tasks, gate thresholds
#   (calibrated on the real splits; recalibrate: python -m factory.checks.calibrate --domain {name} --write).
"""


def _fmt_rate(r: float, n: int) -> str:
    bad = round((1 - r) * n)
    return f"{r:.2%} ({bad} fail)"


def rules_md(name: str, domain, splits: dict, kept: list, dropped: list, derived: dict, decode: set,
             mined_seconds: float) -> str:
    lines = [f"# Rules of domain `{name}`", "",
             f"Mined by `factory init` on the train split ({splits['train'].height:,} rows) in {mined_seconds:.1f} s; "
             "a rule is kept only if it holds on every row of the train, val and test splits. "
             "*support*: rows of the train split on which the rule says something (its condition holds). "
             "*used as*: `derived` (the column is computed from it, so it holds by construction), "
             "`decode` (the decoder's mask enforces it), `check` (validated on every record only).", "",
             "| rule | kind | message | support | used as | " + " | ".join(f"{s} pass" for s in SPLITS) + " |",
             "|---|---|---|---|---|" + "---|" * len(SPLITS)]
    for m, rates in kept:
        target = getattr(m.constraint, "determines", None)
        use = f"derived: {target}" if derived.get(target) == m.name else "decode" if m.name in decode else "check"
        lines.append(f"| `{m.name}` | {m.kind} | {m.message} | {m.support:,} | {use} | "
                     + " | ".join(_fmt_rate(rates[s], splits[s].height) for s in SPLITS) + " |")
    if not kept:
        lines.append("| (none) | | | | | | | |")
    lines += ["", "## Column checks (schema stage)", "",
              "| check | message | " + " | ".join(f"{s} pass" for s in SPLITS) + " |", "|---|---|" + "---|" * len(SPLITS)]
    results = {s: domain.validator.validate(f) for s, f in splits.items()}
    rule_names = {r.name for r in domain.rules}
    for rname, msg in domain.validator.messages.items():
        if rname in rule_names:
            continue
        cells = []
        for s in SPLITS:
            bad = results[s].failures.filter(pl.col("rule") == rname)["row"].n_unique()
            n = splits[s].height
            cells.append(f"{(n - bad) / n:.2%} ({bad} fail)")
        lines.append(f"| `{rname}` | {msg} | " + " | ".join(cells) + " |")
    if dropped:
        lines += ["", "## Dropped: held on the train split, broken on val or test", "",
                  "| rule | kind | message | support | " + " | ".join(f"{s} pass" for s in SPLITS) + " |",
                  "|---|---|---|---|" + "---|" * len(SPLITS)]
        for m, rates in dropped:
            lines.append(f"| `{m.name}` | {m.kind} | {m.message} | {m.support:,} | "
                         + " | ".join(_fmt_rate(rates[s], splits[s].height) for s in SPLITS) + " |")
    return "\n".join(lines) + "\n"


def data_md(name: str, source: Path, source_sha: str, raw: pl.DataFrame, inferred: Inferred, info: dict) -> str:
    lines = [f"# Data of domain `{name}`", "",
             f"- source: `{source.name}` ({raw.height:,} rows x {raw.width} columns), sha256 `{source_sha}`",
             f"- written by `factory init` on {info['date']}",
             f"- split: seeded permutation (numpy default_rng({SPLIT_SEED})), "
             f"{'/'.join(str(int(f * 100)) for f in SPLIT_FRACTIONS)} train/val/test, each split in source row order",
             "", "| split | rows | file | sha256 |", "|---|---|---|---|"]
    for s in SPLITS:
        lines.append(f"| {s} | {info[s]['rows']:,} | `data/{s}.parquet` | `{info[s]['sha256']}` |")
    lines += ["", "## Columns", "", "| column | type | range / values | nullable (share null) |", "|---|---|---|---|"]
    frame = inferred.frame
    for c in inferred.columns:
        if c["type"] == "category":
            vals = c["values"]
            what = ", ".join(map(str, vals[:12])) + (f", ... ({len(vals)} values)" if len(vals) > 12 else "")
        else:
            what = f"[{c['lo']}, {c['hi']}]" + (f", {c['decimals']} decimals" if c.get("decimals") else "")
        share = frame[c["name"]].null_count() / frame.height
        kind = c["type"] + (" (derived)" if c.get("derived") else "")
        lines.append(f"| `{c['name']}` | {kind} | {what} | {'yes' if c['nullable'] else 'no'} ({share:.1%}) |")
    if inferred.excluded:
        lines += ["", "## Excluded columns (never generated)", "", "| column | why |", "|---|---|"]
        lines += [f"| `{e['name']}` | {e['reason']} |" for e in inferred.excluded]
    if inferred.renamed or inferred.notes:
        lines += ["", "## Changes to the source", ""]
        lines += [f"- column `{a}` renamed `{b}` (names are letters, digits and _)" for a, b in inferred.renamed.items()]
        lines += [f"- {n}" for n in inferred.notes]
    return "\n".join(lines) + "\n"


@dataclass
class InitResult:
    path: Path
    columns: int
    excluded: list[dict]
    rules: int
    derived: list[str]
    decode: int
    dropped: int
    seconds: float
    warnings: list[str]


def init_domain(name: str, source: Path, folder: Path | None = None, targets: tuple[str, ...] = (),
                force: bool = False, budget_minutes: float = DEFAULT_BUDGET_MINUTES,
                log: Callable[[str], None] = lambda m: None) -> InitResult:
    """Write the domain folder; see the module docstring. Raises InitError on a user mistake."""
    from factory.checks.base import GateConfig
    from factory.checks.calibrate import calibrate
    from factory.domain import available_domains, builtin_domains

    t0 = time.perf_counter()
    if not NAME_RE.match(name or ""):
        raise InitError(f"domain name {name!r} must be letters, digits and _ (not starting with a digit)")
    if name in builtin_domains():
        raise InitError(f"domain name {name!r} is taken by a built-in domain; choose another name")
    folder = Path(folder) if folder is not None else Path.cwd() / "domains" / name
    if folder.name != name:
        raise InitError(f"--dir {folder}: the folder of domain {name!r} must be named {name!r}")
    other = available_domains().get(name)
    if other is not None and other.resolve() != folder.resolve():
        raise InitError(f"domain name {name!r} is taken by {other}; choose another name")
    if folder.exists() and not force:
        raise InitError(f"{folder} exists; pass --force to replace it")
    source = Path(source)
    warnings: list[str] = []

    def warn(msg):
        warnings.append(msg)
        log(f"warning: {msg}")

    raw = read_source(source)
    inferred = infer(raw, warn)
    names = [c["name"] for c in inferred.columns]
    for t in targets:
        if t not in names:
            why = next((e["reason"] for e in inferred.excluded if e["name"] == t), None)
            raise InitError(f"--target {t!r}: " + (f"that column is excluded ({why})" if why else
                                                   f"no such column (columns: {', '.join(names)})"))
    log(f"read {source.name}: {raw.height:,} rows, {len(names)} columns kept, {len(inferred.excluded)} excluded")
    splits = split(inferred.frame)

    spec0 = _spec(inferred.columns)
    t_mine = time.perf_counter()
    try:
        mined = mine_rules(splits["train"], spec0)
    except ImportError:
        warn("rule mining is not available in this install (factory.mining); only the column checks apply")
        mined = []
    mined_seconds = time.perf_counter() - t_mine
    kept, dropped, derived = choose_rules(mined, spec0, splits)
    log(f"mined {len(mined)} rules in {mined_seconds:.1f} s: {len(kept)} hold on every split, "
        f"{len(derived)} derive a column")
    for c in inferred.columns:
        c["derived"] = c["name"] in derived
    spec = _spec(inferred.columns)
    if not spec.generated_names:
        raise InitError("every column would be derived from another; nothing is left to generate")
    decode = {m.name for m, _ in kept if m.name not in derived.values() and _decodable(m.constraint, spec)}

    now = datetime.now(timezone.utc)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.init-", dir=parent))
    try:
        (tmp / "data").mkdir()
        info = {"source": source.name, "date": now.strftime("%Y-%m-%d %H:%M UTC"), "seed": SPLIT_SEED,
                "fractions": list(SPLIT_FRACTIONS)}
        for s, f in splits.items():
            p = tmp / "data" / f"{s}.parquet"
            f.write_parquet(p, statistics=False)
            info[s] = {"rows": f.height, "sha256": _sha256(p)}
        (tmp / "data" / "splits.json").write_text(json.dumps(info, indent=1) + "\n")
        settings: dict = {"default_model": "difflm", "batch_size": 1000,
                          "train": {"seed": 0, "max_minutes": float(budget_minutes)}}
        if targets:
            settings["mle_tasks"] = [_mle_task(t, spec, kept) for t in targets]
        doc = {"name": name, "description": f"{source.name} ({raw.height:,} rows), from factory init",
               "source": source.name, "excluded": inferred.excluded, "columns": inferred.columns,
               "rules": [_rule_entry(m, derived, decode) for m, _ in kept], "settings": settings}
        domain = build_domain(tmp, doc)
        gates = calibrate(domain, GateConfig())
        settings["gates"] = _plain(gates)
        header = HEADER.format(name=name, source=source.name, date=info["date"])
        (tmp / DOMAIN_FILE).write_text(_toml(doc, header))
        domain = build_domain(tmp)  # what the engine will load: it must load
        (tmp / "RULES.md").write_text(rules_md(name, domain, splits, kept, dropped, derived, decode, mined_seconds))
        (tmp / "DATA.md").write_text(data_md(name, source, _sha256(source), raw, inferred, info))
        if folder.exists():  # --force: swap the old folder out only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent))
            folder.replace(old / name)
            tmp.replace(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return InitResult(folder, len(names), inferred.excluded, len(kept), sorted(derived), len(decode), len(dropped),
                      time.perf_counter() - t0, warnings)


def _spec(columns: list[dict]) -> TableSpec:
    from factory.domain_file import spec_from_columns

    return spec_from_columns(columns, "inferred columns")


def _rule_entry(m, derived: dict, decode: set) -> dict:
    # the mined name and message are written out, so the file shows (and lets you edit) what a
    # rejection will say
    constraint = {"name": m.name, "message": m.message} | {
        k: v for k, v in m.constraint.to_json().items() if k not in ("name", "message")}
    entry = {"kind": str(m.kind), "support": int(m.support), "decode": m.name in decode,
             "constraint": _plain(nulls_to_toml(constraint))}
    target = getattr(m.constraint, "determines", None)
    if target is not None:
        entry["determines"] = target
    return entry


def _mle_task(target: str, spec: TableSpec, kept: list) -> dict:
    """Predict `target` from the other columns, except those a kept rule ties to it exactly
    (they would leak it: a label and its code, a sum and its parts)."""
    leak = set()
    for m, _ in kept:
        c = m.constraint
        if getattr(c, "determines", None) is not None and target in c.columns:
            leak.update(n for n in c.columns if n != target)
    kind = "classification" if isinstance(spec[target], Categorical) else "regression"
    return {"name": target, "target": target, "kind": kind, "exclude": sorted(leak)}


def _plain(x):
    """JSON-like -> what TOML can hold: no None (dropped), tuples as lists, numpy scalars as Python ones."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x if v is not None]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        raise InitError(f"cannot write the non-finite number {x} to {DOMAIN_FILE}")
    return x
