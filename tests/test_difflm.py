"""DiffLM components on tiny configs: shapes, save/load, learning, determinism, schema-guided decoding."""
import json

import polars as pl
import pytest
import torch

from factory.difflm.decoder import DecoderConfig, DomainDecoder
from factory.difflm.diffusion import Denoiser, DenoiserConfig, EDMSampler, SamplerConfig
from factory.difflm.injector import InjectorConfig, SoftPromptInjector
from factory.difflm.tokenizer import NULL, PAD, SchemaTokenizer
from factory.domain import load_domain

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def finance():
    return load_domain("finance")


@pytest.fixture(scope="module")
def tok(finance):
    return SchemaTokenizer(finance.spec, finance.spec.generated_names)


def tiny_decoder(tok, seed=0):
    torch.manual_seed(seed)
    return DomainDecoder(DecoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                       prompt_len=2, vocab_size=tok.vocab_size, seq_len=tok.length))


def parse_all(finance, texts):
    frame, ok, errors = finance.serializer.parse_many(texts, finance.spec.generated_names)
    return frame, errors


# ---- tokenizer ---------------------------------------------------------------------------
def test_tokenizer_round_trips_all_real_rows(finance, tok):
    for split in ("train", "val", "test"):
        df = finance.to_generated(finance.load_split(split))
        ids = tok.encode(df)
        assert ids.shape == (df.height, tok.length)
        assert tok.decode(ids).equals(df)
        assert tok.to_texts(ids) == finance.serializer.serialize_frame(df, finance.spec.generated_names)


def test_tokenizer_save_load_and_schema_mismatch(finance, tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert SchemaTokenizer.from_pretrained(tmp_path, finance.spec).config() == tok.config()
    cfg = json.loads((tmp_path / "tokenizer.json").read_text())
    cfg["columns"] = cfg["columns"][:-1]
    (tmp_path / "tokenizer.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="different schema"):
        SchemaTokenizer.from_pretrained(tmp_path, finance.spec)


def test_unconstrained_garbage_is_rejected_by_the_parser_with_a_reason(finance, tok):
    ids = tok.encode(finance.to_generated(finance.load_split("val").head(3)))
    ids[0, 2] = 5  # a chunk token where `state` (a category) belongs
    ids[1, 4] = PAD  # padding in annual_income
    _, errors = parse_all(finance, tok.to_texts(ids))
    assert [(i, e.column) for i, e in errors] == [(0, "state"), (1, "annual_income")]


@pytest.mark.parametrize("favour", ["random", "specials", "high_chunks", "wrong_categories"])
def test_mask_makes_every_decode_parse_even_for_adversarial_logits(finance, tok, favour):
    """Whatever the logits prefer, masked sampling yields parseable, in-range records."""
    g = torch.Generator().manual_seed(1)
    B, V = 500, tok.vocab_size
    state, out = tok.init_state(B), []
    for t in range(tok.length):
        logits = torch.randn(B, V, generator=g)
        if favour == "specials":
            logits[:, [PAD, NULL, 1]] += 50
        elif favour == "high_chunks":
            logits[:, tok.chunk0 + 90:tok.chunk0 + 100] += 50
        elif favour == "wrong_categories":
            logits[:, ~tok.static_mask[t]] += 50
        logits = logits.masked_fill(~tok.allowed(t, state), float("-inf"))
        nxt = logits.argmax(-1) if favour != "random" else torch.multinomial(logits.softmax(-1), 1, generator=g)[:, 0]
        state = tok.advance(t, state, nxt)
        out.append(nxt)
    frame, errors = parse_all(finance, tok.to_texts(torch.stack(out, 1)))
    assert errors == []
    schema_fail = finance.validator.validate(finance.complete(frame)).failures.filter(pl.col("stage") == "schema")
    # generated columns always respect their ranges; only derived ones may leave theirs
    gen = set(finance.spec.generated_names)
    assert not [r for r in schema_fail["rule"].unique().to_list() if r.split(".")[0] in gen]


# ---- decoder --------------------------------------------------------------------------------
def test_decoder_shapes_save_load_and_frozen(tok, tmp_path):
    dec = tiny_decoder(tok)
    ids = torch.randint(tok.chunk0, tok.chunk0 + 100, (3, tok.length))
    nll = dec.forward_prompted(None, ids)
    assert nll.shape == (3,) and torch.isfinite(nll).all()
    dec.save_pretrained(tmp_path)
    back = DomainDecoder.from_pretrained(tmp_path)
    assert torch.allclose(back.forward_prompted(None, ids), nll)
    dec.freeze()
    assert not any(p.requires_grad for p in dec.parameters())
    (tmp_path / "decoder.safetensors").write_bytes(b"truncated")
    with pytest.raises(Exception):
        DomainDecoder.from_pretrained(tmp_path)


def test_decoder_generate_is_deterministic_and_parses_with_adversarial_bias(finance, tok):
    dec = tiny_decoder(tok).freeze()
    with torch.no_grad():  # a decoder that strongly prefers tokens the schema forbids
        dec.lm.lm_head.weight.zero_()
        dec.lm.get_input_embeddings().weight.zero_()
        bias = torch.zeros(tok.vocab_size)
        bias[[PAD, NULL, 1]] = 100.0
        dec.lm.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    a = dec.generate(None, tok, torch.Generator().manual_seed(3), batch=64)
    b = dec.generate(None, tok, torch.Generator().manual_seed(3), batch=64)
    assert torch.equal(a, b)
    _, errors = parse_all(finance, tok.to_texts(a))
    assert errors == []
    # without the mask the same decoder writes garbage
    c = dec.generate(None, tok, torch.Generator().manual_seed(3), batch=64, constrained=False)
    _, errors = parse_all(finance, tok.to_texts(c))
    assert len(errors) == 64


def test_min_p_keeps_only_tokens_near_the_most_likely(finance, tok):
    """min_p -> 1 keeps only each step's most likely allowed token: the seed no longer matters.
    min_p = 0 samples: different seeds differ. Both still parse (min-p acts after the mask)."""
    torch.manual_seed(0)
    dec = tiny_decoder(tok).freeze()
    greedy = [dec.generate(None, tok, torch.Generator().manual_seed(s), batch=32, min_p=0.999) for s in (1, 2)]
    sampled = [dec.generate(None, tok, torch.Generator().manual_seed(s), batch=32, min_p=0.0) for s in (1, 2)]
    assert torch.equal(greedy[0], greedy[1]) and not torch.equal(sampled[0], sampled[1])
    assert (greedy[0] == greedy[0][0]).all()  # one prompt, one argmax path
    for ids in greedy + sampled:
        assert parse_all(finance, tok.to_texts(ids))[1] == []


def test_decoder_learns_a_tiny_overfit_set(finance, tok):
    dec = tiny_decoder(tok)
    ids = tok.encode(finance.to_generated(finance.load_split("train").head(16)))
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = dec.forward_prompted(None, ids).mean()
        opt.zero_grad(), loss.backward(), opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


# ---- injector ---------------------------------------------------------------------------
def test_injector_shapes_init_and_save_load(tmp_path):
    null = torch.randn(3, 16)
    inj = SoftPromptInjector(InjectorConfig(latent_dim=4, hidden=8, prompt_len=3, embed_dim=16), null_prompt=null)
    z = torch.zeros(5, 4)
    out = inj(z)
    assert out.shape == (5, 3, 16)
    assert torch.allclose(out[0], null, atol=1e-6)  # starts as the decoder's null prompt
    inj.save_pretrained(tmp_path)
    assert torch.allclose(SoftPromptInjector.from_pretrained(tmp_path)(torch.ones(2, 4)), inj(torch.ones(2, 4)))


# ---- diffusion --------------------------------------------------------------------------
def test_denoiser_learns_and_sampler_matches_a_shifted_gaussian(tmp_path):
    torch.manual_seed(0)
    x0 = torch.randn(2048, 2) * torch.tensor([0.3, 1.0]) + torch.tensor([1.0, -1.0])
    x0 = (x0 - x0.mean(0)) / x0.std(0)
    den = Denoiser(DenoiserConfig(latent_dim=2, hidden=64, blocks=2, emb_dim=32))
    opt = torch.optim.Adam(den.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(600):
        loss = den.loss(x0[torch.randint(len(x0), (256,), generator=g)], g)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert sum(losses[-50:]) / 50 < sum(losses[:50]) / 50
    sampler = EDMSampler(SamplerConfig(steps=20))
    s1 = sampler.sample(den, 1000, torch.Generator().manual_seed(5))
    assert torch.equal(s1, sampler.sample(den, 1000, torch.Generator().manual_seed(5)))
    assert s1.mean(0).abs().max() < 0.2 and (s1.std(0) - 1).abs().max() < 0.25
    den.save_pretrained(tmp_path), sampler.save_pretrained(tmp_path)
    back = Denoiser.from_pretrained(tmp_path)
    assert torch.equal(EDMSampler.from_pretrained(tmp_path).sample(back, 10, torch.Generator().manual_seed(1)),
                       sampler.sample(den, 10, torch.Generator().manual_seed(1)))


class _GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of data ~ N(mu, s^2) per dimension: E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s
        self.cfg = DenoiserConfig(latent_dim=len(mu))

    def forward(self, x, sigma):
        return self.mu + self.s**2 / (self.s**2 + sigma[:, None] ** 2) * (x - self.mu)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun"])
def test_both_solvers_converge_to_the_exact_ode_solution_at_second_order(solver):
    """For Gaussian data the probability-flow ODE maps noise x_T to mu + s / sqrt(s^2 + T^2) (x_T - mu)."""
    mu, s = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.3, 1.0, 2.0])
    den = _GaussianDenoiser(mu, s).double()
    errors = []
    for steps in (20, 40, 80):
        cfg = SamplerConfig(steps=steps, solver=solver)
        x = EDMSampler(cfg).sample(den, 500, torch.Generator().manual_seed(3)).double()
        xT = torch.randn(500, 3, generator=torch.Generator().manual_seed(3)) * cfg.sigma_max
        exact = mu + s / (s**2 + cfg.sigma_max**2).sqrt() * (xT - mu)
        errors.append((x - exact).abs().max().item())
    assert errors[2] < 0.02  # the largest error of 500 samples, drawn at sigma_max = 80
    assert errors[2] < errors[1] / 3 < errors[0] / 3**2  # ~4.5x smaller per halved step: 2nd order


def test_an_unknown_solver_is_refused(tmp_path):
    from factory.difflm.config import ModelError

    (tmp_path / "sampler_config.json").write_text('{"steps": 10, "solver": "euler"}')
    with pytest.raises(ModelError, match="field solver must be one of dpmpp_2m, heun"):
        EDMSampler.from_pretrained(tmp_path)


def test_sigma_schedule_is_decreasing_and_ends_at_zero():
    s = EDMSampler(SamplerConfig(steps=10)).sigmas()
    assert len(s) == 11 and s[-1] == 0 and torch.all(s[:-1] > s[1:]) and abs(s[0] - 80) < 1e-3


# ---- decode constraints -----------------------------------------------------------------------
def _decode_with(tok, logits_fn, B=600, seed=2):
    g = torch.Generator().manual_seed(seed)
    state, out = tok.init_state(B), []
    for t in range(tok.length):
        logits = logits_fn(t, g, B).masked_fill(~tok.allowed(t, state), float("-inf"))
        nxt = (logits - torch.log(-torch.log(torch.rand(logits.shape, generator=g).clamp(1e-10, 1)))).argmax(-1)
        state = tok.advance(t, state, nxt)
        out.append(nxt)
    return torch.stack(out, 1)


@pytest.mark.parametrize("favour", ["random", "null", "large_numbers", "small_numbers"])
def test_decode_constraints_make_every_record_pass_every_rule(finance, favour):
    """With the finance relations in the mask, even adversarial logits yield records that pass all rules."""
    tok = SchemaTokenizer(finance.spec, finance.spec.generated_names, finance.decode_constraints)

    def logits(t, g, B):
        x = torch.randn(B, tok.vocab_size, generator=g) * 3
        if favour == "null":
            x[:, NULL] += 40
        elif favour == "large_numbers":
            x[:, tok.chunk0 + 90:tok.chunk0 + 100] += 40
        elif favour == "small_numbers":
            x[:, tok.chunk0:tok.chunk0 + 3] += 40
        return x

    frame, errors = parse_all(finance, tok.to_texts(_decode_with(tok, logits)))
    assert errors == []
    v = finance.validator.validate(finance.complete(frame))
    assert v.n_valid == frame.height, v.first_failure().group_by("rule").len()


def test_without_relations_the_same_logits_break_rules(finance):
    tok = SchemaTokenizer(finance.spec, finance.spec.generated_names)
    frame, errors = parse_all(finance, tok.to_texts(_decode_with(tok, lambda t, g, B: torch.randn(B, tok.vocab_size, generator=g) * 3)))
    assert errors == []
    failed = set(finance.validator.validate(finance.complete(frame)).failures["rule"].to_list())
    assert {"interest_rate_in_sub_grade_band", "joint_income_iff_joint", "open_lines_within_total"} <= failed


def test_decode_constraints_are_checked_when_built(finance):
    from schemas.constraints import AtMost, RangeBy

    cols = finance.spec.generated_names
    with pytest.raises(ValueError, match="must be generated before"):
        SchemaTokenizer(finance.spec, cols, [AtMost("delinq_2y", "loan_amount")])  # loan_amount comes later
    with pytest.raises(ValueError, match="is not generated"):
        SchemaTokenizer(finance.spec, cols, [AtMost("loan_amount", "installment")])  # derived, never generated
    with pytest.raises(ValueError, match="must be categorical"):
        SchemaTokenizer(finance.spec, cols, [RangeBy("loan_amount", "annual_income", {})])


def test_expression_bound_caps_the_column_per_row(finance):
    """AtMostExpr: interest_gap below the schedule never exceeds the schedule's interest, which the
    mask computes with the domain's own polars expression; without it, favouring large numbers
    gives negative paid_interest."""
    from schemas.constraints import AtMostExpr

    (c,) = [c for c in finance.decode_constraints if isinstance(c, AtMostExpr) and c.when == ("interest_vs_schedule", ("below",))]
    assert c.inputs == ["interest_rate", "loan_amount", "loan_status", "payments_made", "term"]

    def large(t, g, B):
        x = torch.randn(B, tok.vocab_size, generator=g) * 3
        x[:, tok.chunk0 + 90:tok.chunk0 + 100] += 40
        return x

    def below_with_reference(frame):
        ref = frame.select(c.bound).to_series()
        return frame.with_columns(ref=ref).filter(pl.col("interest_vs_schedule") == "below")

    tok = SchemaTokenizer(finance.spec, finance.spec.generated_names, finance.decode_constraints)
    frame, errors = parse_all(finance, tok.to_texts(_decode_with(tok, large, B=300)))
    below = below_with_reference(frame)
    assert errors == [] and below.height > 50
    assert (below["interest_gap"] <= below["ref"] + 1e-9).all()
    others = [k for k in finance.decode_constraints if k is not c]
    tok = SchemaTokenizer(finance.spec, finance.spec.generated_names, others)
    frame, _ = parse_all(finance, tok.to_texts(_decode_with(tok, large, B=300)))
    below = below_with_reference(frame)
    assert (below["interest_gap"] > below["ref"] + 1e-9).any()
    with pytest.raises(ValueError, match="must be generated before"):
        SchemaTokenizer(finance.spec, finance.spec.generated_names,
                        [AtMostExpr("loan_amount", pl.col("interest_gap") * 2)])


def test_derived_caps_keep_paid_interest_at_its_train_max(finance):
    """The finance `derived_caps` hook turns a paid_interest maximum into bounds on the latents:
    payments_made at most the last count whose scheduled interest is within the max; interest_gap
    below the schedule at least (schedule - max) via AtLeastExpr, above it at most (max - schedule).
    With small gaps favoured, a long schedule at a high rate then still stays at or under the cap,
    and without the hook it does not."""
    from schemas.constraints import AtLeastExpr

    cap = 2000.0
    extra = finance.derived_caps({"paid_interest": cap})
    assert [(type(c).__name__, c.column) for c in extra] == [
        ("AtMostExpr", "payments_made"), ("AtMostExpr", "interest_gap"), ("AtLeastExpr", "interest_gap")]

    def decode(constraints):
        tok = SchemaTokenizer(finance.spec, finance.spec.generated_names, constraints)

        def small_gap_long_schedule(t, g, B):
            x = torch.randn(B, tok.vocab_size, generator=g) * 3
            s = tok.slots[t]
            if s.column == "interest_gap":
                x[:, tok.chunk0:tok.chunk0 + 2] += 40  # every digit chunk near 0
            elif s.column == "payments_made":
                x[:, tok.chunk0 + 30:tok.chunk0 + 36] += 40  # 30-35 payments
            return x

        frame, errors = parse_all(finance, tok.to_texts(_decode_with(tok, small_gap_long_schedule, B=300)))
        assert errors == []
        return frame.with_columns(si=extra[2].bound + cap)  # the schedule's interest, same expression

    uncapped = decode(finance.decode_constraints)
    assert finance.derive(uncapped)["paid_interest"].max() > cap  # without the hook the schedule goes past the cap
    gaps_only = decode(finance.decode_constraints + extra[1:])  # the AtLeastExpr floor alone
    below = gaps_only.filter(pl.col("interest_vs_schedule") == "below")
    assert below.filter(pl.col("si") > cap).height > 10  # schedules past the cap, pulled back by the floor
    assert finance.derive(below)["paid_interest"].max() <= cap + 1e-6
    capped = decode(finance.decode_constraints + extra)
    # and payments_made stops where the schedule's interest would pass the cap, so above it too
    assert (capped.filter(pl.col("loan_status") != "Fully Paid")["si"] <= cap + 1e-6).all()
    assert finance.derive(capped)["paid_interest"].max() <= cap + 1e-6
    assert isinstance(extra[2], AtLeastExpr) and extra[2].inputs == extra[1].inputs


def test_infeasible_constraints_fall_back_to_the_schema_and_the_rule_rejects(finance):
    from schemas.constraints import AtLeast

    # annual_income_joint >= 10x the 0..9,999,999 range is impossible for large incomes: no row may get stuck
    tok = SchemaTokenizer(finance.spec, finance.spec.generated_names,
                          [AtLeast("loan_amount", "annual_income")])  # loan_amount <= 40,000 < most incomes
    ids = _decode_with(tok, lambda t, g, B: torch.randn(B, tok.vocab_size, generator=g), B=200)
    frame, errors = parse_all(finance, tok.to_texts(ids))
    assert errors == [] and frame.height == 200


# ---- encoder ------------------------------------------------------------------------------------
def test_encoder_split_is_exact_trains_lora_only_and_round_trips(finance, tmp_path):
    from factory.difflm.encoder import EncoderConfig, RecordEncoder, values_text

    torch.manual_seed(0)
    enc = RecordEncoder(EncoderConfig(lora_layers=1, latent_dim=6, max_length=64)).eval()
    rows = finance.to_generated(finance.load_split("val").head(4)).iter_rows(named=True)
    texts = [values_text(r, finance.spec, finance.spec.generated_names) for r in rows]
    hidden, mask = enc.encode_frozen(texts)
    # cached bottom layers + top layer == the whole encoder (LoRA B starts at 0)
    with torch.no_grad():
        full = enc.bert(**enc.tokenize(texts)).last_hidden_state
        ext = enc._ext_mask(mask, hidden.dtype)
        top = enc.bert.encoder.layer[-1](hidden, attention_mask=ext)
        top = top[0] if isinstance(top, tuple) else top
    assert torch.allclose(top, full, atol=1e-5)
    mu, logvar = enc.forward_top(hidden, mask)
    assert mu.shape == logvar.shape == (4, 6)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert all(".layer.5." in n for n in trainable if "lora_" in n)  # only the top layer is adapted
    with torch.no_grad():  # make the adapter non-trivial, then round-trip it
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
        mu, _ = enc.forward_top(hidden, mask)
    enc.save_pretrained(tmp_path)
    assert (tmp_path / "encoder_adapter.safetensors").stat().st_size < 1_000_000  # adapter, not the base model
    back = RecordEncoder.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(back.forward_top(*back.encode_frozen(texts))[0], mu, atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(enc.sample(mu, _, g1), enc.sample(mu, _, g2))


def test_the_generator_records_its_latent_solver_and_a_run_can_keep_an_older_one(finance):
    from factory.generators import GeneratorError, load_generator

    default = load_generator(finance, "difflm")
    assert (default.settings["diffusion_solver"], default.settings["diffusion_steps"]) == ("dpmpp_2m", 25)
    heun = load_generator(finance, "difflm", solver="heun", steps=12)  # what --resume passes for older runs
    assert (heun.settings["diffusion_solver"], heun.settings["diffusion_steps"]) == ("heun", 12)
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(default.sample_latents(8, g), heun.sample_latents(8, torch.Generator().manual_seed(0)))
    with pytest.raises(GeneratorError, match="solver must be one of dpmpp_2m, heun, got 'euler'"):
        load_generator(finance, "difflm", solver="euler")
