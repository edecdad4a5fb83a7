"""The decode step's fused kernels: attention over the few cached positions, residual + RMSNorm, SiLU * up,
Gumbel-max sampling; and its KV cache.

Four functions, each with two implementations of the same maths:
- `decode_attention(qkv, cos, sin, cache, t, scale)`: the new position's q, k, v [B, 3 h hd], before
  the rotary embedding; the position's cos, sin [hd]; one layer of a `KVCache` (the model dtype's
  keys and values [B, h, Tmax, hd], or int8 with scales). Rotates q and k, stores k and v at
  position t - 1, then attends to [0, t).
- `add_rms_norm(x, d, w, eps)`: (x + d, LlamaRMSNorm(x + d)); d may be None.
- `silu_mul(gu)`: silu(gate) * up for gu = [gate | up] [B, 2 I].
- `gumbel_argmax(logits, u)`: Gumbel-max sampling, argmax(logits - log(-log(u))) per row, given
  torch.rand's uniforms u (so both implementations draw the same random numbers).
Implementations:
- "fused": a small C++ file (kernels/decode_step.cpp), built with the system's C++ compiler on
  first use and cached by torch (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR). At this size
  PyTorch's per-op cost exceeds the arithmetic: SDPA's set-up per (row, head) costs more than a
  1 x 32 query against <= 61 keys, and an RMSNorm is 9 aten ops over a [B, 128] tensor;
- "sdpa": the same steps in aten ops (torch's scaled_dot_product_attention for attention), when
  no compiler is available or FACTORY_ATTENTION=sdpa.
Each elementwise result is rounded to the model dtype where the aten ops round it; the two differ
only in float32 reductions (the order of a sum, exp's last bit), so the run records which one ran
(settings.attention).
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

SOURCE = Path(__file__).parent / "kernels" / "decode_step.cpp"
# 512-bit vectors where the CPU has them: the SiLU and Gumbel loops run 25% faster than GCC's default
# 256 on this Xeon (the attention loop is memory-bound, the same either way).
BASE_FLAGS = ["-O3", "-ffast-math", "-fopenmp-simd"]
FLAGS = BASE_FLAGS + (["-march=native", "-mprefer-vector-width=512"]
                      if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"])


def _cpu_signature() -> str:
    try:  # -march=native code is only valid on the CPU that built it: key the cache by CPU flags
        return next((ln for ln in open("/proc/cpuinfo") if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


# Older x86 targets the source must also build for (tests/test_decode_step.py builds them and checks each
# kernel against its aten ops): -march=native here compiles only the AVX-512 paths.
PORTABLE = ("x86-64-v3", "x86-64")  # AVX2; SSE2 only (the plain C++ paths)


def _notice_build(build: Path) -> None:
    """One line on stderr when this machine first compiles the kernels (~25 s), from one process of a run."""
    try:
        os.close(os.open(build / ".build-notice", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except OSError:  # another process of this run said it already, or the folder is read-only
        return
    print(f"note: compiling the decode kernels for this CPU (once per machine, ~25 s; cached in {build})",
          file=sys.stderr, flush=True)


@lru_cache(maxsize=None)
def _fused_module(march: str | None = None):
    """The kernels built for this CPU (-march=native), or for `march`, one of PORTABLE (tests only)."""
    from torch.utils.cpp_extension import _get_build_directory, load

    if march is not None and march not in PORTABLE:
        raise ValueError(f"march must be one of {', '.join(PORTABLE)}, got {march!r}")
    flags = FLAGS if march is None else BASE_FLAGS + [f"-march={march}"]
    source = SOURCE.read_text()
    cpu = _cpu_signature() if march is None else ""
    key = hashlib.sha256((source + " ".join(flags) + cpu + torch.__version__).encode())
    name = f"factory_decode_step_{key.hexdigest()[:12]}"
    # Build from a copy inside the build folder: torch's ninja file names the source by its absolute
    # path, so two checkouts (a benchmark's older commit, a CI clone) loading the same kernel from
    # their own paths would otherwise rebuild it in turn, ~20 CPU s each time a worker loads it.
    build = Path(_get_build_directory(name, verbose=False))
    copy = build / SOURCE.name
    if not copy.is_file() or copy.read_text() != source:
        tmp = build / f".{SOURCE.name}.{os.getpid()}"
        tmp.write_text(source)
        os.replace(tmp, copy)  # atomic: a process building at the same time reads one whole file
    if not (build / f"{name}.so").is_file():
        _notice_build(build)
    return load(name=name, sources=[str(copy)], extra_cflags=flags, build_directory=str(build), verbose=False)


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
        print(f"note: the fused decode kernels could not be built ({type(e).__name__}: {str(e)[:120]}); "
              "using torch SDPA (slower)", file=sys.stderr)
        return "sdpa"
    return "fused"


def _rotate_half(x: torch.Tensor, hd: int) -> torch.Tensor:  # transformers' rotate_half, per head
    x = x.unflatten(-1, (-1, hd))
    return torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1).flatten(-2)


TILE = 16  # positions per key tile of the int8 cache


class KVCache:
    """The keys and values of one decode run, all layers: [L, B, heads, T, head_dim] in the model
    dtype, or with `int8` each cached k and v as int8 plus one float32 scale (its absolute maximum
    / 127), keys in tiles of 16 positions ([L, B, heads, T / 16, head_dim, 16]) so the kernel
    computes 16 scores per vector. int8 reads ~72 bytes per key and head instead of bf16's 128:
    the decode loop's bound at 2,000 rows, whose caches do not fit in a core's L2. Its error is
    10x below bf16's own (next-token KL vs float32 on the finance stack: 3.9e-6 vs 3.9e-5 nats)."""

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, int8: bool):
        if int8:
            T = -(-length // TILE) * TILE
            shape = (layers, batch, heads)
            self.tensors = [torch.empty(*shape, T // TILE, head_dim, TILE, dtype=torch.int8, device=device),
                            torch.zeros(*shape, T, device=device),  # zeros: a tile's unused lanes stay finite
                            torch.empty(*shape, T, head_dim, dtype=torch.int8, device=device),
                            torch.zeros(*shape, T, device=device)]
        else:
            self.tensors = [torch.empty(layers, batch, heads, length, head_dim, dtype=dtype, device=device)
                            for _ in range(2)]

    def layer(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(x[i] for x in self.tensors)

    def select_rows(self, idx: torch.Tensor):
        """Keep rows `idx` of the running batch (a resampling: rows may repeat)."""
        self.tensors = [x[:, idx] for x in self.tensors]


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [..., n] -> int8 [..., n], scale [...]
    amax = x.float().abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x.float() / scale[..., None]).to(torch.int8), scale


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple[torch.Tensor, ...],
                     t: int, scale: float, impl: str = "fused") -> torch.Tensor:
    """`cache`: one layer of a `KVCache` (K, V; or int8 keys, scales, values, scales)."""
    if impl == "fused" and qkv.device.type == "cpu":
        kernel = _fused_module()
        return (kernel.decode_attention_q8 if len(cache) == 4 else kernel.decode_attention)(
            qkv, cos, sin, *cache, t, scale)
    B, h, hd = qkv.shape[0], cache[-2].shape[1], cache[-2].shape[-1]
    qk, v = qkv[:, :2 * h * hd], qkv[:, 2 * h * hd:]
    qk = qk * cos.repeat(2 * h) + _rotate_half(qk, hd) * sin.repeat(2 * h)
    q, k, v = qk[:, :h * hd].reshape(B, h, 1, hd), qk[:, h * hd:].reshape(B, h, hd), v.reshape(B, h, hd)
    if len(cache) == 2:
        K, V = cache
        K[:, :, t - 1], V[:, :, t - 1] = k, v
        keys, values = K[:, :, :t], V[:, :, :t]
    else:  # the int8 cache, the kernel's maths in aten ops (its test reference): dequantized in float32
        Kq, Ks, Vq, Vs = cache
        j = t - 1
        Kq[:, :, j // TILE, :, j % TILE], Ks[:, :, j] = _quantize(k)
        Vq[:, :, j], Vs[:, :, j] = _quantize(v)
        keys = Kq.transpose(-1, -2).flatten(2, 3)[:, :, :t].float() * Ks[:, :, :t, None]
        values = Vq[:, :, :t].float() * Vs[:, :, :t, None]
        q = q.float()
    out = F.scaled_dot_product_attention(q, keys, values, scale=scale)
    return out.reshape(B, h * hd).to(qkv.dtype)


def add_rms_norm(x: torch.Tensor, d: torch.Tensor | None, w: torch.Tensor, eps: float,
                 impl: str = "fused") -> tuple[torch.Tensor, torch.Tensor]:
    if impl == "fused" and x.device.type == "cpu":
        return _fused_module().add_rms_norm(x, d, w, eps)
    if d is not None:
        x = x + d
    xf = x.to(torch.float32)  # transformers' LlamaRMSNorm
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return x, w * xf.to(x.dtype)


def silu_mul(gu: torch.Tensor, impl: str = "fused") -> torch.Tensor:
    if impl == "fused" and gu.device.type == "cpu":
        return _fused_module().silu_mul(gu)
    gate, up = gu.chunk(2, -1)
    return F.silu(gate) * up


def gumbel_argmax(logits: torch.Tensor, u: torch.Tensor, impl: str = "fused") -> torch.Tensor:
    if impl == "fused" and logits.device.type == "cpu":
        return _fused_module().gumbel_argmax(logits, u)
    u = u.clamp_(1e-10, 1.0)
    return (logits - torch.log(-torch.log(u))).argmax(-1)
