"""Decode-step attention: one new query per row and head over the few cached positions.

`decode_attention(q, k, v, K, V, t, scale)`: the new position's q, k, v [B, h * hd]; the caches,
keys K and values V [B, h, Tmax, hd]. Stores k and v at position t - 1, then attends to positions
[0, t). Two implementations, same maths:
- "fused": a small C++ loop (kernels/decode_attention.cpp), built with the system's C++ compiler on
  first use and cached by torch (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR); about 3-4x
  faster than SDPA here, because SDPA's per-(row, head) set-up costs more than a 1 x 32 query
  against <= 61 keys (measured in benchmarks/decode_step.py);
- "sdpa": torch's scaled_dot_product_attention, when no compiler is available or
  FACTORY_ATTENTION=sdpa.
Both compute in float32 inside; their results differ by float rounding only, so the run records
which one ran (settings.attention).
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).parent / "kernels" / "decode_attention.cpp"
FLAGS = ["-O3", "-ffast-math", "-fopenmp-simd"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64")
                                                    else ["-mcpu=native"])


def _cpu_signature() -> str:
    try:  # -march=native code is only valid on the CPU that built it: key the cache by CPU flags
        return next((ln for ln in open("/proc/cpuinfo") if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


@lru_cache(maxsize=None)
def _fused_module():
    from torch.utils.cpp_extension import _get_build_directory, load

    source = SOURCE.read_text()
    key = hashlib.sha256((source + " ".join(FLAGS) + _cpu_signature() + torch.__version__).encode())
    name = f"factory_decode_attention_{key.hexdigest()[:12]}"
    # Build from a copy inside the build folder: torch's ninja file names the source by its absolute
    # path, so two checkouts (a benchmark's older commit, a CI clone) loading the same kernel from
    # their own paths would otherwise rebuild it in turn, ~20 CPU s each time a worker loads it.
    build = Path(_get_build_directory(name, verbose=False))
    copy = build / SOURCE.name
    if not copy.is_file() or copy.read_text() != source:
        tmp = build / f".{SOURCE.name}.{os.getpid()}"
        tmp.write_text(source)
        os.replace(tmp, copy)  # atomic: a process building at the same time reads one whole file
    return load(name=name, sources=[str(copy)], extra_cflags=FLAGS, build_directory=str(build), verbose=False)


@lru_cache(maxsize=None)
def implementation() -> str:
    """"fused" if the C++ loop builds (or is cached) on this machine, else "sdpa" (FACTORY_ATTENTION forces one)."""
    want = os.environ.get("FACTORY_ATTENTION", "fused")
    if want not in ("fused", "sdpa"):
        raise ValueError(f"FACTORY_ATTENTION must be fused or sdpa, got {want!r}")
    if want == "sdpa":
        return "sdpa"
    try:
        _fused_module()
    except Exception as e:  # no compiler, no ninja, no Python headers: the slower path still works
        print(f"note: the fused decode attention could not be built ({type(e).__name__}: {str(e)[:120]}); "
              "using torch SDPA (slower)", file=sys.stderr)
        return "sdpa"
    return "fused"


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, K: torch.Tensor, V: torch.Tensor, t: int,
                     scale: float, impl: str = "fused") -> torch.Tensor:
    if impl == "fused" and q.device.type == "cpu":
        return _fused_module().decode_attention(q, k, v, K, V, t, scale)
    B, h, hd = V.shape[0], V.shape[1], V.shape[3]
    K[:, :, t - 1] = k.reshape(B, h, hd)
    V[:, :, t - 1] = v.reshape(B, h, hd)
    out = F.scaled_dot_product_attention(q.reshape(B, h, 1, hd), K[:, :, :t], V[:, :, :t],
                                         scale=scale)
    return out.reshape(B, h * hd)
