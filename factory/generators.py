"""The generator interface, and how a CLI model name becomes a generator.

A generator writes serialized records: `generate(n, seed)` returns n texts over
the domain's *generated* columns only (derived columns are filled by the loop
with `domain.complete`). The same (n, seed) must give the same texts, so a run
is reproducible from its seed. `model_id` and `model_version` are stored with
every run, which is how a record's lineage is answered.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from factory.domain import Domain

GENERATORS = ("baseline", "difflm")
PRECISIONS = ("auto", "float32", "bfloat16")


class GeneratorError(ValueError):
    pass


@runtime_checkable
class Generator(Protocol):
    model_id: str  # lineage: which kind of model ("baseline", "difflm")
    model_version: str  # which fitted state (a checksum of marginals / weights)

    def generate(self, n: int, seed: int) -> list[str]: ...


def default_model(domain: Domain) -> str:
    return domain.config.get("default_model", "baseline")


def load_generator(domain: Domain, name: str | None = None, model_dir=None, device: str = "cpu",
                   **opts) -> Generator:
    """`name` is a CLI model name; None means the domain's default model.
    `model_dir` (difflm only) is a trained stack folder; default: the domain's shipped `model/`.
    `device` (cpu, cuda or auto): where difflm runs; the baseline runs on CPU only (cpu and auto)."""
    name = default_model(domain) if name is None else name
    if model_dir is not None and name != "difflm":
        raise GeneratorError(f"--model-dir applies to --model difflm only, not {name!r}")
    if name == "baseline":
        if device == "cuda":
            raise GeneratorError("--device cuda: the baseline runs on CPU only; use --device cpu or auto")
        if device not in ("cpu", "auto"):
            raise GeneratorError(f"--device must be one of cpu, cuda, auto, got {device!r}")
        if opts.pop("precision", "auto") != "auto":
            raise GeneratorError("--precision applies to --model difflm only")
        from factory.baseline import MarginalBaseline

        return MarginalBaseline.fit(domain, **opts)
    if name == "difflm":
        from pathlib import Path

        model_dir = Path(model_dir) if model_dir is not None else domain.model_dir
        missing = (f"no trained DiffLM stack at {model_dir}; "
                   f"run `factory train --domain {domain.name}` or use --model baseline")
        if not model_dir.is_dir():
            raise GeneratorError(missing)
        try:
            from factory.difflm.device import DeviceError, resolve_device
            from factory.difflm.pipeline import DiffLMGenerator, ModelError
        except ImportError as e:
            # Only a missing difflm package means "not built yet"; a broken import inside it is a bug.
            if e.name is None or not e.name.startswith("factory.difflm"):
                raise
            raise GeneratorError(missing) from None
        try:
            device = resolve_device(device)
        except DeviceError as e:
            raise GeneratorError(str(e)) from None
        if opts.get("precision", "auto") not in PRECISIONS:
            raise GeneratorError(f"--precision must be one of {', '.join(PRECISIONS)}, got {opts['precision']!r}")
        try:
            return DiffLMGenerator.from_pretrained(model_dir, domain=domain, device=device, **opts)
        except FileNotFoundError as e:
            raise GeneratorError(f"{missing} ({e})") from None
        except ModelError as e:  # an incomplete or mismatched stack: say what is wrong, and what to do
            raise GeneratorError(f"{e}; run `factory train --domain {domain.name}` or use --model baseline") from None
    raise GeneratorError(f"unknown model {name!r}; choose one of: {', '.join(GENERATORS)}")
