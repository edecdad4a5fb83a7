"""A domain is a folder: `domains/<name>/domain.py` defines `DOMAIN = Domain(...)`.

The engine is domain-agnostic: it only ever talks to a `Domain`. Domains are
discovered under the built-in `domains/` folder and under every folder listed in
the FACTORY_DOMAINS_PATH environment variable (os.pathsep-separated), which is
how tests plug in a second domain.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import polars as pl

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
    return extra + [BUILTIN_DOMAINS]


def available_domains() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for base in search_paths():
        if base.is_dir():
            for d in sorted(base.iterdir()):
                if (d / "domain.py").is_file() and d.name not in found:
                    found[d.name] = d
    return found


_cache: dict[Path, Domain] = {}


def load_domain(name: str) -> Domain:
    found = available_domains()
    if name not in found:
        raise DomainError(f"unknown domain {name!r}; available: {', '.join(sorted(found)) or 'none'}")
    path = found[name].resolve()
    if path in _cache:
        return _cache[path]
    if path.parent == BUILTIN_DOMAINS.resolve():
        module = importlib.import_module(f"domains.{name}.domain")
    else:  # an external domain folder: import it as a package of its own
        pkg = f"factory_ext_domains_{abs(hash(str(path)))}"
        if pkg not in sys.modules:
            parent = types.ModuleType(pkg)
            parent.__path__ = [str(path.parent)]
            sys.modules[pkg] = parent
        module = importlib.import_module(f"{pkg}.{name}.domain")
    domain = getattr(module, "DOMAIN", None)
    if not isinstance(domain, Domain):
        raise DomainError(f"{path / 'domain.py'} must define DOMAIN = Domain(...)")
    _cache[path] = domain
    return domain


def load_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DomainError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
