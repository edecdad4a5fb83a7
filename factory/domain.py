"""A domain is a folder: `domains/<name>/domain.py` defines `DOMAIN = Domain(...)`, or
`domains/<name>/domain.toml` declares it (factory/domain_file.py; `factory init` writes one).

The engine is domain-agnostic: it only ever talks to a `Domain`. Domains are
discovered under every folder listed in the FACTORY_DOMAINS_PATH environment variable
(os.pathsep-separated), under `./domains` of the working directory (where `factory init`
writes), and under the built-in `domains/` folder, in that order.

A domain's settings (`config.json`, read with `load_config`) are checked when the domain
loads: a wrong type, an out-of-range value or an unknown key is a DomainError that names
the file and the field, e.g. `.../config.json: batch_size must be a positive integer, got 'abc'`.
So is a file the domain needs that does not exist (a module domain.py imports, a data file).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import types
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import polars as pl

from factory.domain_file import DOMAIN_FILE, build_domain
from factory.rules import Rule, Validator, rule_set_hash
from factory.serializer import Serializer
from schemas.columns import TableSpec

BUILTIN_DOMAINS = Path(__file__).resolve().parent.parent / "domains"


class DomainError(ValueError):
    pass


class FrameError(ValueError):
    """A frame handed to `Domain.complete` lacks a generated column or has one of another dtype.

    The message names every such column (and its dtype). `complete` cannot derive columns from
    such a frame; `Validator.validate`, which judges rows, reports the same faults as row failures.
    """


@dataclass
class Domain:
    name: str
    root: Path
    spec: TableSpec
    rules: list[Rule]
    derive: Callable[[pl.DataFrame], pl.DataFrame]  # generated columns -> full record (adds derived columns)
    load_split: Callable[[str], pl.DataFrame]  # "train" | "val" | "test"
    description: str = ""
    config: dict = field(default_factory=dict)
    # relations the decoder's token mask enforces (schemas/constraints.py); the rules still check them
    decode_constraints: list = field(default_factory=list)
    # records -> the same rows with the spec's latent columns added (schemas/columns.py);
    # required when the spec has latent columns; `complete(to_generated(x))` must give back every
    # record x that passes the rules (tests/test_latent.py checks this on the real finance splits)
    latents: Callable[[pl.DataFrame], pl.DataFrame] | None = None
    # {derived column: its train-split maximum} -> decode constraints that keep each derived
    # column at or below that maximum (optional; the train-max caps of the DiffLM sampler,
    # factory/difflm/pipeline.observed_max_constraints, cap generated columns directly but can
    # reach a derived one only through this)
    derived_caps: Callable[[dict], list] | None = None

    def __post_init__(self):
        if self.spec.latent and self.latents is None:
            raise DomainError(f"domain {self.name!r}: the spec has latent columns "
                              f"({', '.join(self.spec.latent_names)}) but no latents= function to compute them")
        if self.config is not None:
            check_config(self.config, getattr(self.config, "source", None) or f"{Path(self.root) / 'domain.py'} (config)")
        inner = self.load_split.load_split if isinstance(self.load_split, _SplitLoader) else self.load_split
        self.load_split = _SplitLoader(self.name, inner)

    @cached_property
    def serializer(self) -> Serializer:
        return Serializer(self.spec)

    @cached_property
    def validator(self) -> Validator:
        return Validator(self.spec, self.rules)

    @cached_property
    def rule_set_hash(self) -> str:
        return rule_set_hash(self.spec, self.rules)

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def to_generated(self, records: pl.DataFrame) -> pl.DataFrame:
        """Records (e.g. a real split) -> what a model writes for them: the generated columns,
        latent ones computed by the domain's `latents`. Models and the baseline train on this."""
        if self.latents is not None:
            records = self.latents(records)
        return records.select(self.spec.generated_names)

    def complete(self, generated: pl.DataFrame) -> pl.DataFrame:
        """Generated columns -> full records in spec order (derived columns filled; other columns dropped).

        A generated column that is missing or of another dtype than the spec's is a FrameError."""
        faults = []
        for name, dtype in self.spec.polars_schema(self.spec.generated_names).items():
            if name not in generated.columns:
                faults.append(f"column {name!r} is missing")
            elif generated.schema[name] != dtype:
                faults.append(f"column {name!r} is {generated.schema[name]}, expected {dtype}")
        if faults:
            raise FrameError(f"cannot complete {self.name} records: " + "; ".join(faults))
        return self.derive(generated.select(self.spec.generated_names)).select(self.spec.names)


def search_paths() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("FACTORY_DOMAINS_PATH", "").split(os.pathsep) if p]
    out, seen = [], set()
    for p in extra + [Path.cwd() / "domains", BUILTIN_DOMAINS]:
        key = p.resolve() if p.exists() else p
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _is_domain_folder(d: Path) -> bool:
    return (d / "domain.py").is_file() or (d / DOMAIN_FILE).is_file()


def available_domains() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for base in search_paths():
        if base.is_dir():
            for d in sorted(base.iterdir()):
                if d.is_dir() and _is_domain_folder(d) and d.name not in found:
                    found[d.name] = d
    return found


def builtin_domains() -> set[str]:
    return {d.name for d in BUILTIN_DOMAINS.iterdir() if d.is_dir() and _is_domain_folder(d)}


_cache: dict = {}  # folder (domain.py) or (folder, mtime of domain.toml) -> Domain


def load_domain(name: str) -> Domain:
    found = available_domains()
    if name not in found:
        folders = [base / name for base in search_paths() if (base / name).is_dir()]
        if folders:
            raise DomainError(f"{folders[0]} is not a domain: it has no domain.py or {DOMAIN_FILE}")
        raise DomainError(f"unknown domain {name!r}; available: {', '.join(sorted(found)) or 'none'}")
    path = found[name].resolve()
    if not (path / "domain.py").is_file():  # a declarative domain (domain.toml): reloaded when edited
        key = (path, (path / DOMAIN_FILE).stat().st_mtime_ns)
        if key not in _cache:
            domain = build_domain(path)
            if domain.name != name:
                raise DomainError(f"{path / DOMAIN_FILE} declares a domain named {domain.name!r}; "
                                  f"its folder is {name!r}: the two must be the same")
            _cache[key] = domain
        return _cache[key]
    if path in _cache:
        return _cache[path]
    if path.parent == BUILTIN_DOMAINS.resolve():
        package = f"domains.{name}"
    else:  # an external domain folder: import it as a package of its own
        pkg = f"factory_ext_domains_{abs(hash(str(path)))}"
        if pkg not in sys.modules:
            parent = types.ModuleType(pkg)
            parent.__path__ = [str(path.parent)]
            sys.modules[pkg] = parent
        package = f"{pkg}.{name}"
    module = _import_domain(package, path)
    domain = getattr(module, "DOMAIN", None)
    if not isinstance(domain, Domain):
        raise DomainError(f"{path / 'domain.py'} must define DOMAIN = Domain(...)")
    if domain.name != name:
        raise DomainError(f"{path / 'domain.py'} defines a domain named {domain.name!r}; "
                          f"its folder is {name!r}: the two must be the same")
    _cache[path] = domain
    return domain


def _import_domain(package: str, path: Path):
    """Import `<package>.domain`. A module or file of the domain folder that does not exist is a
    DomainError naming it; any other error is a bug in the domain and keeps its traceback."""
    try:
        return importlib.import_module(f"{package}.domain")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith(package + "."):
            raise  # a missing third-party package, not a file of the domain
        rel = e.name[len(package) + 1:].replace(".", "/")
        raise DomainError(f"{path / 'domain.py'} imports {rel.replace('/', '.')!r}, but neither "
                          f"{path / rel}.py nor {path / rel}/ exists") from None
    except ImportError as e:
        if e.name != package:
            raise
        raise DomainError(f"{path / 'domain.py'}: {str(e).replace(package, path.name)}") from None
    except FileNotFoundError as e:
        raise DomainError(f"{path / 'domain.py'} reads {e.filename}, which does not exist") from None


class _SplitLoader:
    """A domain's `load_split`, with a missing data file as a DomainError naming it (picklable)."""

    def __init__(self, domain: str, load_split: Callable[[str], pl.DataFrame]):
        self.domain, self.load_split = domain, load_split

    def __call__(self, split: str) -> pl.DataFrame:
        try:
            return self.load_split(split)
        except FileNotFoundError as e:
            # polars gives no filename, and shortens the path in its message: keep what it says
            what = e.filename or str(e).strip().splitlines()[0].replace(" (set POLARS_VERBOSE=1 to see full path)", "")
            raise DomainError(f"domain {self.domain!r}: the {split} split needs a file that does not exist: "
                              f"{what}") from None


class Config(dict):
    """A domain's settings, remembering the file they came from (for error messages)."""

    source: str | None = None


def load_config(root: Path) -> dict:
    """`root/config.json` (no file: no settings), checked field by field (see check_config)."""
    path = Path(root) / "config.json"
    if not path.exists():
        return Config()
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DomainError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except RecursionError:
        raise DomainError(f"{path}: JSON nested too deeply to read") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DomainError(f"{path}: cannot read it ({e})") from None
    check_config(raw, str(path))
    config = Config(raw)
    config.source = str(path)
    return config


MAX_BATCH = 1_000_000  # texts per batch: beyond this one batch alone would not fit in memory
CONFIG_KEYS = ("default_model", "batch_size", "gates", "train", "mle_tasks")
GATE_KEYS = ("alpha", "min_rows", "min_values", "coverage_min_share", "ordinal", "thresholds", "privacy",
             "calibration")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def check_config(config, source: str) -> None:
    """Every field of a domain's settings has the right type and range, and no key is unknown.
    A DomainError names `source` (the file) and the field."""
    from factory.generators import GENERATORS

    def fail(field: str, problem: str, value=None):
        got = "" if value is None else f", got {json.dumps(value, default=str)}"
        raise DomainError(f"{source}: {field} {problem}{got}")

    def known(obj: dict, keys, where: str):
        unknown = sorted(set(obj) - set(keys))
        if unknown:
            field = ", ".join(f"{where}{k}" for k in unknown)
            raise DomainError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {field} "
                              f"(known: {', '.join(f'{where}{k}' for k in keys)})")

    if not isinstance(config, dict):
        raise DomainError(f"{source}: the settings must be a JSON object, got {type(config).__name__}")
    known(config, CONFIG_KEYS, "")
    if "batch_size" in config and not (_is_int(config["batch_size"]) and config["batch_size"] > 0):
        fail("batch_size", "must be a positive integer", config["batch_size"])
    if "batch_size" in config and config["batch_size"] > MAX_BATCH:
        fail("batch_size", f"must be at most {MAX_BATCH:,}", config["batch_size"])
    if "default_model" in config and config["default_model"] not in GENERATORS:
        fail("default_model", f"must be one of {', '.join(GENERATORS)}", config["default_model"])
    if "train" in config and not isinstance(config["train"], dict):
        fail("train", "must be an object of training settings", config["train"])
    if "mle_tasks" in config:
        tasks = config["mle_tasks"]
        if not isinstance(tasks, list):
            fail("mle_tasks", "must be a list of {name, target, kind[, exclude]} objects", tasks)
        for i, t in enumerate(tasks):
            if not isinstance(t, dict):
                fail(f"mle_tasks[{i}]", "must be an object", t)
            known(t, ("name", "target", "kind", "exclude"), f"mle_tasks[{i}].")
            for k in ("name", "target"):
                if not isinstance(t.get(k), str) or not t.get(k):
                    fail(f"mle_tasks[{i}].{k}", "must be a non-empty string", t.get(k))
            if t.get("kind") not in ("regression", "classification"):
                fail(f"mle_tasks[{i}].kind", "must be 'regression' or 'classification'", t.get("kind"))
            if not (isinstance(t.get("exclude", []), list) and all(isinstance(x, str) for x in t.get("exclude", []))):
                fail(f"mle_tasks[{i}].exclude", "must be a list of column names", t.get("exclude"))
    if "gates" in config:
        _check_gates(config["gates"], fail, known)


def _check_gates(g, fail, known) -> None:
    if not isinstance(g, dict):
        fail("gates", "must be an object", g)
    known(g, GATE_KEYS, "gates.")
    if "alpha" in g and not (_is_number(g["alpha"]) and 0 < g["alpha"] < 1):
        fail("gates.alpha", "must be a number between 0 and 1", g["alpha"])
    for k, least in (("min_rows", 0), ("min_values", 1)):
        if k in g and not (_is_int(g[k]) and g[k] >= least):
            fail(f"gates.{k}", f"must be an integer >= {least}", g[k])
    if "coverage_min_share" in g and not (_is_number(g["coverage_min_share"]) and 0 <= g["coverage_min_share"] <= 1):
        fail("gates.coverage_min_share", "must be a number in [0, 1]", g["coverage_min_share"])
    if "ordinal" in g and not (isinstance(g["ordinal"], list) and all(isinstance(c, str) for c in g["ordinal"])):
        fail("gates.ordinal", "must be a list of column names", g["ordinal"])
    if "calibration" in g and not isinstance(g["calibration"], dict):
        fail("gates.calibration", "must be an object", g["calibration"])
    thresholds = g.get("thresholds", {})
    if not isinstance(thresholds, dict):
        fail("gates.thresholds", "must be an object of check name -> threshold", thresholds)
    for name, v in thresholds.items():
        top = 1 if name.startswith("coverage:") else math.inf
        if not (_is_number(v) and 0 <= v <= top):
            fail(f"gates.thresholds.{name}", "must be a number in [0, 1]" if top == 1 else "must be a number >= 0", v)
    p = g.get("privacy", {})
    if not isinstance(p, dict):
        fail("gates.privacy", "must be an object {enabled, near_copy_dcr}", p)
    known(p, ("enabled", "near_copy_dcr"), "gates.privacy.")
    if "enabled" in p and not isinstance(p["enabled"], bool):
        fail("gates.privacy.enabled", "must be true or false", p["enabled"])
    if p.get("near_copy_dcr") is not None and not (_is_number(p["near_copy_dcr"]) and p["near_copy_dcr"] >= 0):
        fail("gates.privacy.near_copy_dcr", "must be a number >= 0 (or null)", p["near_copy_dcr"])
