"""The fast decode step (DecodeStep + its fused kernels) against transformers' own Llama forward."""
from pathlib import Path

import pytest
import torch

from factory.difflm import fused
from factory.difflm.decoder import DecoderConfig, DomainDecoder
from factory.difflm.tokenizer import SchemaTokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok(finance):
    return SchemaTokenizer(finance.spec, finance.spec.generated_names)


def tiny(tok, seed=0, layers=2, heads=2, hidden=32):
    torch.manual_seed(seed)
    dec = DomainDecoder(DecoderConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=48,
                                      prompt_len=3, vocab_size=tok.vocab_size, seq_len=tok.length)).freeze()
    with torch.no_grad():  # random weights of the trained model's scale, so attention is not uniform
        for p in dec.parameters():
            p.normal_(0, 0.3)
    return dec


@pytest.mark.parametrize("impl", ["fused", "sdpa"])
@pytest.mark.parametrize("heads,hidden", [(2, 32), (4, 128)])
def test_step_logits_match_the_transformers_forward(tok, impl, heads, hidden):
    dec = tiny(tok, heads=heads, hidden=hidden)
    B, k, L = 7, 3, 20
    x = torch.randn(B, k + L, hidden)
    with torch.no_grad():
        ref = dec.lm(inputs_embeds=x, use_cache=False).logits  # full causal forward, float32
        step = dec.decode_step()
        step.attention = impl
        step.start(B, k + L)
        got = torch.stack([step.step(x[:, p], p) for p in range(k + L)], 1)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=2e-4, rtol=1e-4), (got - ref).abs().max()
    assert not torch.allclose(got[:, 1:], got[:, :1].expand_as(got[:, 1:]))  # positions do matter


@pytest.mark.parametrize("impl", ["fused", "sdpa"])
def test_bf16_step_with_its_int8_cache_stays_within_bf16_rounding_of_transformers(tok, impl):
    """The bf16 step (int8 cache with the fused kernels) against transformers' bf16 forward (bf16 cache),
    both against float32: the int8 cache adds less error than bf16 rounding already makes."""
    dec = tiny(tok, heads=4, hidden=128)
    B, k, L = 16, 3, 30
    x = torch.randn(B, k + L, 128)
    with torch.no_grad():
        ref = torch.log_softmax(dec.lm(inputs_embeds=x, use_cache=False).logits, -1)  # float32
        dec.to_precision("bfloat16")
        ref16 = torch.log_softmax(dec.lm(inputs_embeds=x.bfloat16(), use_cache=False).logits.float(), -1)
        step = dec.decode_step()
        step.attention = impl
        assert step.kv_cache == {"fused": "int8", "sdpa": "bfloat16"}[impl]  # the aten path: no int8
        step.start(B, k + L)
        got = torch.log_softmax(torch.stack([step.step(x[:, p].bfloat16(), p).float() for p in range(k + L)], 1), -1)

    def kl(a):
        return (ref.exp() * (ref - a)).sum(-1).mean()
    assert 0 < kl(got) < 2 * kl(ref16), (kl(got), kl(ref16))


def needs_compiler():
    if fused.implementation() != "fused":
        pytest.skip("no C++ compiler here: only the aten path runs")


def _cache_layer(B, h, T, hd, dtype, int8):
    cache = fused.KVCache(1, B, h, T, hd, dtype, torch.device("cpu"), int8)
    for x in cache.tensors:  # earlier positions: random, as a run would have left them
        x.copy_(torch.randint(-127, 128, x.shape) if x.dtype == torch.int8 else torch.rand(x.shape) * 0.02)
    return cache


@pytest.mark.parametrize("int8", [False, True])
def test_fused_attention_matches_its_aten_ops(int8):
    needs_compiler()
    check_attention_kernels(int8)


def check_attention_kernels(int8):
    torch.manual_seed(1)
    B, h, hd, T = 5, 3, 32, 20
    cos, sin = torch.randn(2, hd)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        qkv = torch.randn(B, 4 * h * hd).to(dtype)[:, :3 * h * hd]  # strided rows, as the step passes them
        a_cache = _cache_layer(B, h, T, hd, dtype, int8)
        b_cache = fused.KVCache(1, B, h, T, hd, dtype, torch.device("cpu"), int8)
        b_cache.tensors = [x.clone() for x in a_cache.tensors]
        c, s = cos.to(dtype), sin.to(dtype)
        for t in (1, 5, 17, T):
            a = fused.decode_attention(qkv, c, s, a_cache.layer(0), t, 0.2, "fused").float()
            b = fused.decode_attention(qkv, c, s, b_cache.layer(0), t, 0.2, "sdpa").float()
            assert torch.allclose(a, b, atol=tol), (dtype, t, (a - b).abs().max())
            # both stored the same (rotated, quantized) k and v at t - 1
            for x, y in zip(a_cache.tensors, b_cache.tensors):
                if x.dtype == torch.int8:  # a quotient on the rounding edge may round the other way
                    assert (x.int() - y.int()).abs().max() <= 1 and (x == y).float().mean() > 0.99
                else:
                    assert torch.allclose(x.float(), y.float(), rtol=1e-6, atol=1e-7), (dtype, t)
        if not int8:
            K = a_cache.tensors[0][0]
            assert not torch.allclose(K[:, :, 0].float(), qkv[:, h * hd:2 * h * hd].reshape(B, h, hd).float())


def test_the_int8_cache_attends_as_the_float_cache_within_its_rounding():
    """int8 keys and values (one scale each) change attention far less than the values themselves."""
    torch.manual_seed(3)
    B, h, hd, T = 64, 4, 32, 48
    qkv_steps = [torch.randn(B, 3 * h * hd) for _ in range(T)]
    cos, sin = torch.randn(T, hd).cos(), torch.randn(T, hd).sin()
    impl = fused.implementation()
    caches = {q: fused.KVCache(1, B, h, T, hd, torch.float32, torch.device("cpu"), q) for q in (False, True)}
    outs = {q: torch.stack([fused.decode_attention(x, cos[p], sin[p], caches[q].layer(0), p + 1, hd ** -0.5, impl)
                            for p, x in enumerate(qkv_steps)]) for q in caches}
    err = (outs[True] - outs[False]).abs()
    assert err.max() < 0.05 and err.mean() < 0.005, (err.max(), err.mean())
    assert err.max() > 0  # it did quantize
    assert caches[True].tensors[0].dtype == torch.int8 and caches[True].tensors[0].element_size() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_silu_and_sampling_match_their_aten_ops(dtype):
    needs_compiler()
    check_norm_silu_sampling_kernels(dtype)


def check_norm_silu_sampling_kernels(dtype):
    torch.manual_seed(2)
    B, H, inter = 64, 128, 48
    x = torch.randn(B, 2 * H).to(dtype)[:, :H]  # a strided view, like a prompt position
    d, w = torch.randn(B, H).to(dtype), torch.randn(H).to(dtype)
    for res in (None, d):
        (xa, na), (xb, nb) = (fused.add_rms_norm(x, res, w, 1e-6, impl) for impl in ("fused", "sdpa"))
        assert torch.equal(xa, xb)  # the residual add rounds as aten's does
        assert torch.allclose(na.float(), nb.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
        # bf16: the float32 mean may differ in its last bit, so a rare element rounds the other way
        assert dtype == torch.float32 or (na == nb).float().mean() > 0.98
    gu = torch.randn(B, 2 * inter).to(dtype) * 4
    a, b = fused.silu_mul(gu, "fused"), fused.silu_mul(gu, "sdpa")
    assert torch.allclose(a.float(), b.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    assert dtype == torch.float32 or (a == b).float().mean() > 0.98
    logits = torch.randn(B, 229).masked_fill(torch.rand(B, 229) < 0.5, float("-inf"))
    u = torch.rand(B, 229)
    ids = fused.gumbel_argmax(logits, u.clone(), "fused")
    assert torch.equal(ids, fused.gumbel_argmax(logits, u.clone(), "sdpa"))
    assert torch.isfinite(logits.gather(1, ids[:, None])).all()  # never a masked token


@pytest.mark.slow
@pytest.mark.parametrize("march", fused.PORTABLE)
def test_builds_for_older_cpus_match_the_aten_ops_too(march, tmp_path, monkeypatch, capsys):
    """-march=native on this machine compiles the kernels' AVX-512 paths only; a CPU without AVX-512
    runs their AVX2 or plain C++ paths. Built for those targets (in a fresh cache: the first build
    says so, once), every kernel must match its aten ops as the native build does."""
    import platform

    needs_compiler()
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the portable targets are x86 ones")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    kernel = fused._fused_module(march)
    assert kernel is not fused._fused_module() and f"-march={march}" in (Path(kernel.__file__).parent /
                                                                          "build.ninja").read_text()
    assert capsys.readouterr().err.count("compiling the decode kernels") == 1
    fused._notice_build(Path(kernel.__file__).parent)  # a second process of the run stays quiet
    assert "compiling" not in capsys.readouterr().err
    monkeypatch.setattr(fused, "_fused_module", lambda: kernel)
    for int8 in (False, True):
        check_attention_kernels(int8)
    for dtype in (torch.float32, torch.bfloat16):
        check_norm_silu_sampling_kernels(dtype)


def test_fast_generate_samples_the_same_ids_as_transformers_in_float32(tok, finance):
    dec = tiny(tok, layers=2, heads=4, hidden=128)
    prompt = torch.randn(64, 3, 128) * 0.5
    runs = {impl: dec.generate(prompt, tok, torch.Generator().manual_seed(5), impl=impl)
            for impl in ("fast", "transformers")}
    assert torch.equal(runs["fast"], runs["transformers"])
    other = dec.generate(prompt, tok, torch.Generator().manual_seed(6))
    assert not torch.equal(other, runs["fast"])
    _, _, errors = finance.serializer.parse_many(tok.to_texts(runs["fast"]), finance.spec.generated_names)
    assert errors == []


def test_step_is_rebuilt_when_the_weights_change(tok):
    dec = tiny(tok)
    first = dec.decode_step()
    assert dec.decode_step() is first
    with torch.no_grad():
        dec.lm.model.norm.weight.mul_(2)
    assert dec.decode_step() is not first
    dec.to(torch.bfloat16)
    assert dec.decode_step().dtype == torch.bfloat16


def test_another_checkout_reuses_the_built_kernel_instead_of_rebuilding_it(tmp_path):
    """Two copies of factory (a CI clone, a benchmark's older commit) load one kernel build: torch's
    ninja file must not name a checkout's own path, or each load from the other copy rebuilds it."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if fused.implementation() != "fused":
        pytest.skip("no C++ compiler here: the SDPA path has nothing to build")
    built = Path(fused._fused_module().__file__)
    stamp = built.stat().st_mtime_ns
    shutil.copytree(Path(fused.__file__).parents[1], tmp_path / "factory")
    code = "from factory.difflm import fused as a; print(a.__file__); print(a._fused_module().__file__)"
    p = subprocess.run([sys.executable, "-c", code],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    module, so = p.stdout.split()
    assert Path(module).is_relative_to(tmp_path)  # the copy ran, not this checkout
    assert Path(so) == built and built.stat().st_mtime_ns == stamp


def test_the_sampling_llama_samples_the_same_ids_as_transformers(finance):
    """DomainDecoder(inference=True) holds the shipped weights without transformers' modules; its
    DecodeStep (rotary tables included) must give exactly the ids of the LlamaForCausalLM-built one."""
    from factory.difflm.decoder import _SamplingLlama

    path = finance.model_dir
    lite = DomainDecoder.from_pretrained(path / "decoder", inference=True).freeze()
    full = DomainDecoder.from_pretrained(path / "decoder").freeze()
    assert isinstance(lite.lm, _SamplingLlama) and not isinstance(full.lm, _SamplingLlama)
    tok = SchemaTokenizer.from_pretrained(path, finance.spec)
    for precision in ("float32", "bfloat16"):
        a = lite.to_precision(precision).generate(None, tok, torch.Generator().manual_seed(3), batch=300)
        b = full.to_precision(precision).generate(None, tok, torch.Generator().manual_seed(3), batch=300)
        assert torch.equal(a, b), precision
    with pytest.raises(NotImplementedError):
        lite.forward_prompted(None, a[:2])
