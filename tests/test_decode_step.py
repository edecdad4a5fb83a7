"""The fast decode step (DecodeStep + fused attention) against transformers' own Llama forward."""
import pytest
import torch

from factory.difflm import attention
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


def test_fused_attention_matches_sdpa_in_both_precisions():
    torch.manual_seed(1)
    B, h, hd, T = 5, 3, 32, 12
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        qkv = torch.randn(B, 3 * h * hd).to(dtype)  # strided rows, as the step passes them
        q, k, v = qkv[:, :h * hd], qkv[:, h * hd:2 * h * hd], qkv[:, 2 * h * hd:]
        K, V = torch.randn(B, h, T, hd).to(dtype), torch.randn(B, h, T, hd).to(dtype)
        K2, V2 = K.float().clone(), V.float().clone()
        for t in (1, 5, T):
            a = attention.decode_attention(q, k, v, K, V, t, 0.2, "fused").float()
            b = attention.decode_attention(q.float(), k.float(), v.float(), K2, V2, t, 0.2, "sdpa")
            assert torch.allclose(a, b, atol=tol), (dtype, t, (a - b).abs().max())
            assert torch.equal(K.float(), K2) and torch.equal(V.float(), V2)  # both stored k, v at t - 1


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

    if attention.implementation() != "fused":
        pytest.skip("no C++ compiler here: the SDPA path has nothing to build")
    built = Path(attention._fused_module().__file__)
    stamp = built.stat().st_mtime_ns
    shutil.copytree(Path(attention.__file__).parents[1], tmp_path / "factory")
    code = "from factory.difflm import attention as a; print(a.__file__); print(a._fused_module().__file__)"
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
