"""Reading a stack's JSON files safely: every field's type and range is checked before a
component is built, so a bad file is one ModelError line naming the file and the field,
never a traceback from deep inside torch (or a crash mid-run, as `steps: -1` gave)."""
from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path


class ModelError(ValueError):
    pass


MAX_INT = 1 << 20  # no size in a compact CPU stack is anywhere near a million


def read_json_object(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ModelError(f"{path}: not valid JSON{where}; restore the file or retrain the stack") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: must be a JSON object, got {type(value).__name__}; restore the file or retrain")
    return value


def _describe(v) -> str:
    try:
        return json.dumps(v)[:60]
    except (TypeError, ValueError):
        return repr(v)[:60]


def load_config(cls, path: str | Path, ranges: dict | None = None):
    """A config dataclass from its JSON file: no unknown or missing-typed fields; ints are ints
    (not bools, not strings) in [0, MAX_INT], floats are finite numbers; `ranges` maps a
    field to (predicate, description) for further limits, e.g. {"rho": (lambda v: v > 0, "> 0")}."""
    return check_fields(cls, read_json_object(path), str(path), ranges)


def check_fields(cls, raw: dict, where: str, ranges: dict | None = None, skip: tuple[str, ...] = ()):
    """`cls(**raw)` after the checks `load_config` describes; errors name `where` and the field.
    Fields in `skip` are passed through unchecked (nested sections the caller checks)."""
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ModelError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(known)})")
    ranges = ranges or {}
    for name, value in raw.items():
        if name in skip:
            continue
        default = getattr(cls(), name)
        bad = None
        if isinstance(default, bool):
            bad = None if isinstance(value, bool) else "must be true or false"
        elif isinstance(default, int):
            if not (isinstance(value, int) and not isinstance(value, bool)):
                bad = "must be an integer"
            elif abs(value) > MAX_INT:
                bad = f"must be an integer of at most {MAX_INT:,}"
            elif value < 0 and name not in ranges:
                bad = "must be >= 0"
        elif isinstance(default, float):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                bad = "must be a finite number"
        elif isinstance(default, str):
            bad = None if isinstance(value, str) else "must be a string"
        elif isinstance(default, tuple):  # JSON has lists; the dataclass keeps tuples
            if isinstance(value, list):
                raw = {**raw, name: tuple(value)}
            elif not isinstance(value, tuple):
                bad = "must be a list"
        if bad is None and name in ranges:
            ok, text = ranges[name]
            if not ok(value):
                bad = f"must be {text}"
        if bad:
            raise ModelError(f"{where}: field {name} {bad}, got {_describe(value)}")
    cfg = cls(**raw)
    check = ranges.get("__all__")
    if check is not None and not check[0](cfg):
        raise ModelError(f"{where}: {check[1]}")
    return cfg


POSITIVE = (lambda v: v >= 1, ">= 1")


class Pretrained:
    """`save_pretrained(path)` / `from_pretrained(path)` for a stack component: its config
    dataclass as `config_file` (read back through `load_config`, so a bad field is one ModelError
    line) and, for a module, its weights as `weights_file` (safetensors), as diffusers'
    ConfigMixin/ModelMixin do. A component sets `config_class`, `config_ranges`, the two file
    names, and overrides `_state`/`_load_state` when it saves only part of its weights."""

    config_class: type
    config_ranges: dict | None = None
    config_file: str
    weights_file: str | None = None  # None: the config is the whole component (a sampler's settings)

    def _state(self) -> dict:
        return {k: v.contiguous() for k, v in self.state_dict().items()}

    def _load_state(self, state: dict, path: Path) -> None:
        self.load_state_dict(state)

    def save_pretrained(self, path: str | Path) -> None:
        from dataclasses import asdict

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / self.config_file).write_text(json.dumps(asdict(self.cfg), indent=1))
        if self.weights_file is not None:
            from safetensors.torch import save_file

            save_file(self._state(), str(path / self.weights_file))

    @classmethod
    def from_pretrained(cls, path: str | Path, **init_kwargs):
        """`init_kwargs` go to the constructor after the config (e.g. a decoder's `inference`)."""
        path = Path(path)
        component = cls(load_config(cls.config_class, path / cls.config_file, cls.config_ranges), **init_kwargs)
        if cls.weights_file is not None:
            from safetensors.torch import load_file

            component._load_state(load_file(str(path / cls.weights_file)), path)
        return component
