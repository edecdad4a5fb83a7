"""A declarative domain: `domains/<name>/domain.toml`, no Python needed.

`factory init` writes one from a user's table; a person reviews and edits it. It holds

- `[[columns]]`: name, type (`integer`, `decimal` or `category`), `lo`/`hi`, `decimals`,
  `values`, `nullable`, `derived` (computed by a rule, never generated);
- `[[rules]]`: one `constraint` each (`schemas.constraints.constraint_from_json`), with its
  name, message and the `support` it had on the real rows; a null (missing value) inside a
  constraint's lists is written "null". Each constraint is the single
  declaration of a relation: its validation rule (`rule()`), its decode-time mask (when the
  decoder can enforce it, `decode = true`) and, for a constraint that determines a column
  (`Determines`, `SumOf`), that column's derivation (`derive_expr()`);
- `[settings]`: the domain's config (default model, batch size, `train`, `gates`, `mle_tasks`),
  checked field by field like a `config.json`;
- `[[excluded]]`: columns of the source table left out, and why (for the record only).

The real splits live in `data/{train,val,test}.parquet` (see DATA.md). A folder with a
`domain.py` is loaded from Python instead, so arithmetic a file cannot express stays possible.
"""
from __future__ import annotations

import tomllib
from functools import partial
from pathlib import Path

import polars as pl

from schemas.columns import NULL_TEXT, Categorical, Numeric, TableSpec

DOMAIN_FILE = "domain.toml"
SPLITS = ("train", "val", "test")
COLUMN_TYPES = ("integer", "decimal", "category")
COLUMN_KEYS = ("name", "type", "lo", "hi", "decimals", "values", "nullable", "derived", "description")
RULE_KEYS = ("constraint", "kind", "support", "decode", "determines")
TOP_KEYS = ("name", "description", "source", "columns", "rules", "settings", "excluded")


def _error(msg: str):
    from factory.domain import DomainError

    return DomainError(msg)


def read_domain_file(path: Path) -> dict:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise _error(f"{path}: invalid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _error(f"{path}: cannot read it ({e})") from None
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise _error(f"{path}: unknown key {', '.join(unknown)} (known: {', '.join(TOP_KEYS)})")
    return doc


def spec_from_columns(columns: list, source: str) -> TableSpec:
    """`[[columns]]` entries -> a TableSpec; a bad entry is a DomainError naming the column and field."""
    if not isinstance(columns, list) or not columns:
        raise _error(f"{source}: [[columns]] must list at least one column")
    out = []
    for i, c in enumerate(columns):
        where = f"{source}: columns[{i}]" + (f" ({c.get('name')!r})" if isinstance(c, dict) else "")
        if not isinstance(c, dict):
            raise _error(f"{where} must be a table")
        unknown = sorted(set(c) - set(COLUMN_KEYS))
        if unknown:
            raise _error(f"{where}: unknown key {', '.join(unknown)} (known: {', '.join(COLUMN_KEYS)})")
        if not isinstance(c.get("name"), str) or not c["name"]:
            raise _error(f"{where}: name must be a non-empty string")
        kind = c.get("type")
        if kind not in COLUMN_TYPES:
            raise _error(f"{where}: type must be one of {', '.join(COLUMN_TYPES)}, got {kind!r}")
        common = dict(nullable=bool(c.get("nullable", False)), derived=bool(c.get("derived", False)),
                      description=str(c.get("description", "")))
        try:
            if kind == "category":
                values = c.get("values")
                if not isinstance(values, list) or not values:
                    raise ValueError("a category column needs a non-empty list of values")
                out.append(Categorical(c["name"], tuple(values), **common))
            else:
                for k in ("lo", "hi"):
                    if not isinstance(c.get(k), (int, float)) or isinstance(c.get(k), bool):
                        raise ValueError(f"{k} must be a number")
                decimals = int(c.get("decimals", 0 if kind == "integer" else 2))
                if kind == "integer" and decimals:
                    raise ValueError("an integer column has decimals = 0; use type = \"decimal\"")
                out.append(Numeric(c["name"], c["lo"], c["hi"], decimals=decimals, **common))
        except (ValueError, TypeError) as e:
            raise _error(f"{where}: {e}") from None
    try:
        return TableSpec(tuple(out))
    except ValueError as e:
        raise _error(f"{source}: {e}") from None


def constraints_of(rules: list, source: str) -> list:
    """`[[rules]]` entries -> (constraint, entry) pairs."""
    if not rules:
        return []
    from schemas.constraints import constraint_from_json

    out = []
    for i, r in enumerate(rules):
        where = f"{source}: rules[{i}]"
        if not isinstance(r, dict) or not isinstance(r.get("constraint"), dict):
            raise _error(f"{where} must be a table with a [rules.constraint] table")
        unknown = sorted(set(r) - set(RULE_KEYS))
        if unknown:
            raise _error(f"{where}: unknown key {', '.join(unknown)} (known: {', '.join(RULE_KEYS)})")
        try:
            c = constraint_from_json(nulls_from_toml(r["constraint"]))
        except (ValueError, KeyError, TypeError) as e:
            name = r["constraint"].get("name", "")
            raise _error(f"{where}{f' ({name})' if name else ''}: {e}") from None
        out.append((c, r))
    return out


def nulls_to_toml(d: dict) -> dict:
    """A constraint's JSON -> TOML, which has no null: a None field is left out (every such field
    defaults to None) and a None inside a list (a null condition value, a null in a mapping) is
    written "null", the text no category may take (schemas.columns.NULL_TEXT)."""
    def inner(v):
        if isinstance(v, (list, tuple)):
            return [NULL_TEXT if x is None else inner(x) for x in v]
        if isinstance(v, dict):
            return {k: inner(x) for k, x in v.items() if x is not None}
        return v

    return {k: inner(v) for k, v in d.items() if v is not None}


def nulls_from_toml(d: dict) -> dict:
    """The inverse of nulls_to_toml: "null" inside a list is None again."""
    def inner(v):
        if isinstance(v, list):
            return [None if x == NULL_TEXT else inner(x) for x in v]
        if isinstance(v, dict):
            return {k: inner(x) for k, x in v.items()}
        return v

    return {k: inner(v) for k, v in d.items()}


def derive_frame(df: pl.DataFrame, steps: list[tuple[str, pl.Expr]], names: list[str]) -> pl.DataFrame:
    """Add each derived column from its expression, in order (a step may read an earlier one)."""
    for name, expr in steps:
        df = df.with_columns(expr.alias(name))
    return df.select(names)


def _derivation_order(determining: dict, spec: TableSpec, source: str) -> list[tuple[str, pl.Expr]]:
    """Derived column -> its expression, ordered so that each reads only generated or earlier-derived columns."""
    done = set(spec.generated_names)
    pending = dict(determining)
    steps = []
    while pending:
        ready = [n for n, (c, e) in pending.items() if set(c.columns) - {n} <= done]
        if not ready:
            raise _error(f"{source}: derived columns {', '.join(sorted(pending))} depend on each other in a cycle")
        for n in ready:
            steps.append((n, pending.pop(n)[1]))
            done.add(n)
    return steps


def load_split_file(data_dir: Path, spec: TableSpec, split: str) -> pl.DataFrame:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    df = pl.read_parquet(Path(data_dir) / f"{split}.parquet")
    return df.select([pl.col(n).cast(t) for n, t in spec.polars_schema().items()])


def build_domain(root: Path, doc: dict | None = None, *, check_columns: bool = True):
    """The Domain of a folder holding `domain.toml` (or of `doc`, its parsed contents)."""
    from factory.domain import Config, Domain

    root = Path(root)
    source = str(root / DOMAIN_FILE)
    doc = read_domain_file(root / DOMAIN_FILE) if doc is None else doc
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise _error(f"{source}: name must be a non-empty string")
    spec = spec_from_columns(doc.get("columns"), source)
    pairs = constraints_of(doc.get("rules"), source)
    rules, decode, determining = [], [], {}
    for c, entry in pairs:
        missing = [n for n in c.columns if n not in spec.names]
        if missing:
            raise _error(f"{source}: rule {c.name!r} reads column {', '.join(missing)}, which is not in [[columns]]")
        rules.append(c.rule())
        target = getattr(c, "determines", None)
        if target is not None and spec[target].derived:
            if target in determining:
                raise _error(f"{source}: column {target!r} is derived by two rules "
                             f"({determining[target][0].name}, {c.name}); keep one")
            col = spec[target]  # the derived value in the column's own dtype (and decimals)
            expr = c.derive_expr()
            if isinstance(col, Numeric) and col.decimals:
                expr = expr.round(col.decimals)
            determining[target] = (c, expr.cast(col.dtype))
        elif entry.get("decode", False):
            decode.append(c)
    underived = [col.name for col in spec.columns if col.derived and col.name not in determining]
    if underived:
        raise _error(f"{source}: derived column {', '.join(underived)} has no rule that determines it "
                     "(a Determines or SumOf rule); set derived = false or add one")
    steps = _derivation_order(determining, spec, source)
    if decode:  # a rule marked decode = true must be one the decoder can mask in this column order
        from factory.difflm.tokenizer import mask_plan

        order = {n: i for i, n in enumerate(spec.generated_names)}
        for c in decode:
            try:
                mask_plan(c, spec, order)
            except ValueError as e:
                raise _error(f"{source}: rule {c.rule().name!r} has decode = true, but the decoder cannot "
                             f"enforce it ({e}); set decode = false") from None
    config = Config(doc.get("settings", {}))
    config.source = source  # Domain checks it field by field, naming this file
    return Domain(name=name, root=root, spec=spec, rules=rules,
                  derive=partial(derive_frame, steps=steps, names=spec.names),
                  load_split=partial(load_split_file, root / "data", spec),
                  description=str(doc.get("description", "")), config=config, decode_constraints=decode)


def update_settings(root: Path, key: str, value) -> Path:
    """Set `[settings.<key>]` of a folder's domain.toml (keeping its header comments), via temp file + rename."""
    import os

    import tomli_w

    path = Path(root) / DOMAIN_FILE
    text = path.read_text()
    doc = read_domain_file(path)
    doc.setdefault("settings", {})[key] = value
    header = _leading_comments(text)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(header + tomli_w.dumps(doc))
    tmp.replace(path)
    return path


def _leading_comments(text: str) -> str:
    out = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        out.append(line + "\n")
    return "".join(out)
