"""Benchmark: the per-step cost of schema-guided token masks, ours vs structured-generation libraries.

    nice -n 5 python benchmarks/mask_libraries.py [--domain finance] [--quick]

Issue 5 asks for an existing structured-generation library if one fits the speed
target (100,000 records in <= 10 min on 2 cores: 50 batches of 2,000 rows x ~54
decode steps, so a whole decode step should cost well under ~0.1 s). This measures,
in one run on this machine, what producing the next-token mask (and accepting the
sampled token) costs per decode step for a batch of B rows, for:

- ours: `SchemaTokenizer.allowed` + `advance` (tensor ops for the whole batch,
  one torch thread as the pipeline runs), with every decode constraint;
- xgrammar (GrammarMatcher per row, and its batched BatchGrammarMatcher API),
  outlines-core (Guide per row) and llguidance (LLMatcher per row, and its
  batched LLExecutor) over the SAME vocabulary (id -> token string: PAD/BOS/NULL,
  chunks "00".."99", one token per categorical value) with a grammar equivalent to
  our record format (EBNF for xgrammar; the same grammar as one regex for the other
  two). The grammar encodes column order, categorical values, nullability, numeric
  ranges exactly (fixed-width digit ranges), the joint-application nullability
  rules (a branch per application_type) and the interest-rate band per sub_grade
  (a branch per sub_grade). It does NOT encode the AtMost/AtLeast comparisons
  between two numeric columns (not expressible without enumerating value pairs).

Tokens fed to every library are rows decoded by our tokenizer with random logits
(valid under every constraint, so also under the weaker grammar); a validation pass
checks on every (row, step) that our mask is a subset of each library's mask.
Writes reports/benchmarks/mask_libraries.{json,md}.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from benchmarks.machine import header, machine_info  # noqa: E402
from factory.difflm.tokenizer import BOS, NULL, PAD, SchemaTokenizer  # noqa: E402
from factory.domain import load_domain  # noqa: E402
from schemas.columns import Categorical  # noqa: E402
from schemas.constraints import NULL_PATTERNS, AtLeast, AtMost, RangeBy  # noqa: E402

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "benchmarks"
BATCHES = (1, 100, 2000)
N_RECORDS = 100_000
perf = time.perf_counter


# ---- the vocabulary as strings -------------------------------------------------------------
def vocab_strings(tok: SchemaTokenizer) -> list[str]:
    v = [""] * tok.vocab_size
    v[PAD], v[BOS], v[NULL] = "<pad>", "<bos>", "<null>"
    for d in range(100):
        v[tok.chunk0 + d] = f"{d:02d}"
    for col, ids in tok.cat_ids.items():
        for value, i in ids.items():
            v[i] = f"<{col}={value}>"
    assert all(v) and len(set(v)) == len(v)
    return v


# ---- a tiny grammar AST, rendered as xgrammar EBNF or as one regex ----------------------------
@dataclass
class Lit:
    s: str


@dataclass
class Digits:  # k decimal digits, any value
    k: int


@dataclass
class DigitRange:  # one digit in [a, b]
    a: int
    b: int


@dataclass
class Seq:
    items: list


@dataclass
class Alt:
    items: list


@dataclass
class Ref:
    name: str


def fixed_width(lo: int, hi: int, w: int):
    """Strings of exactly w decimal digits whose value lies in [lo, hi]."""
    assert 0 <= lo <= hi < 10 ** w, (lo, hi, w)
    if w == 0:
        return Seq([])
    if lo == hi:
        return Lit(str(lo).zfill(w))
    if lo == 0 and hi == 10 ** w - 1:
        return Digits(w)
    p = 10 ** (w - 1)
    a, b = divmod(lo, p)
    c, d = divmod(hi, p)
    if a == c:
        return Seq([Lit(str(a)), fixed_width(b, d, w - 1)])
    alts, start, end = [], a, c
    if b:
        alts.append(Seq([Lit(str(a)), fixed_width(b, p - 1, w - 1)]))
        start = a + 1
    if d != p - 1:
        end = c - 1
    if start <= end:
        alts.append(Seq([DigitRange(start, end)] + ([Digits(w - 1)] if w > 1 else [])))
    if d != p - 1:
        alts.append(Seq([Lit(str(c)), fixed_width(0, d, w - 1)]))
    return Alt(alts)


def one(items):
    return items[0] if len(items) == 1 else Alt(items)


def ebnf(node) -> str:
    if isinstance(node, Lit):
        return '"' + node.s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(node, Digits):
        return "[0-9]" + (f"{{{node.k}}}" if node.k > 1 else "")
    if isinstance(node, DigitRange):
        return f"[{node.a}-{node.b}]"
    if isinstance(node, Ref):
        return node.name
    if isinstance(node, Seq):
        return '""' if not node.items else "(" + " ".join(ebnf(i) for i in node.items) + ")"
    return "(" + " | ".join(ebnf(i) for i in node.items) + ")"


def regex(node, rules: dict) -> str:
    if isinstance(node, Lit):
        return "".join("\\" + ch if ch in "\\.+*?()|[]{}^$#&-~" else ch for ch in node.s)
    if isinstance(node, Digits):
        return "[0-9]" + (f"{{{node.k}}}" if node.k > 1 else "")
    if isinstance(node, DigitRange):
        return f"[{node.a}-{node.b}]"
    if isinstance(node, Ref):
        return regex(rules[node.name], rules)
    if isinstance(node, Seq):
        return "".join(regex(i, rules) for i in node.items)
    return "(?:" + "|".join(regex(i, rules) for i in node.items) + ")"


def build_grammar(tok: SchemaTokenizer, constraints) -> tuple[dict, list]:
    """Rules {name: node} ("root" first) equivalent to the record format, and the constraints left out."""
    spec, cols, names = tok.spec, tok.columns, vocab_strings(tok)
    n_chunks = {s.column: s.n_chunks for s in tok.slots}
    nulls = [c for c in constraints if isinstance(c, NULL_PATTERNS)]
    bands = {c.column: c for c in constraints if isinstance(c, RangeBy)}
    left_out = [c for c in constraints if isinstance(c, (AtMost, AtLeast))]
    whens = {c.when for c in nulls}
    if len(whens) > 1:
        raise NotImplementedError(f"nullability conditioned on several columns: {sorted(whens)}")
    when = next(iter(whens), None)
    order = {c: i for i, c in enumerate(cols)}
    by_start = {order[c.by]: c for c in bands.values()}
    for c in bands.values():
        if when is not None and order[c.by] <= order[when]:
            raise NotImplementedError("a RangeBy segment before the nullability branch column")

    def col_node(name, force=None, band=None):
        col, alts = spec[name], []
        value_ok, null_ok = force != "null", col.nullable and force != "notnull"
        if isinstance(col, Categorical):
            if value_ok:
                alts += [Lit(names[i]) for i in tok.cat_ids[name].values()]
            if null_ok:
                alts.append(Lit("<null>"))
        else:
            n = n_chunks[name]
            lo, hi = col.int_lo, col.int_hi
            if band is not None:
                lo, hi = max(lo, band[0]), min(hi, band[1])
            if value_ok:
                alts.append(fixed_width(lo, hi, 2 * n))
            if null_ok:
                alts.append(Seq([Lit("<null>")] + [Lit("<pad>")] * (n - 1)))
        return one(alts)

    rules: dict = {"root": None}

    def columns(start: int, force: dict, tag: str) -> list:
        out, i = [], start
        while i < len(cols):
            if i in by_start:  # the `by` column through the banded column, one branch per `by` value
                c = by_start[i]
                end, col, by = order[c.column], spec[c.column], spec[c.by]
                middle = [col_node(cols[j], force.get(cols[j])) for j in range(i + 1, end)]
                alts = []
                for v, tid in tok.cat_ids[c.by].items():
                    band = (round(c.bounds[v][0] * col.scale), round(c.bounds[v][1] * col.scale)) \
                        if v in c.bounds else None
                    alts.append(Seq([Lit(names[tid])] + middle + [col_node(c.column, force.get(c.column), band)]))
                if by.nullable and force.get(c.by) != "notnull":
                    alts.append(Seq([Lit("<null>")] + middle + [col_node(c.column, force.get(c.column))]))
                name = f"{c.by}_{c.column}_{tag}"
                rules[name] = one(alts)
                out.append(Ref(name))
                i = end + 1
            else:
                out.append(col_node(cols[i], force.get(cols[i])))
                i += 1
        return out

    if when is None:
        rules["root"] = Seq(columns(0, {}, "all"))
        return rules, left_out
    w = order[when]
    prefix = [col_node(cols[j]) for j in range(w)]
    alts = []
    for v, tid in tok.cat_ids[when].items():
        force = {}
        for c in nulls:
            forced = c.on_hit if (v in c.values) != c.invert else c.on_miss
            if forced is not None:
                force[c.column] = "null" if forced == "null" else "notnull"
        name = f"after_{when}_{v}".replace(" ", "_")
        rules[name] = Seq(columns(w + 1, force, str(v).replace(" ", "_")))
        alts.append(Seq([Lit(names[tid]), Ref(name)]))
    if spec[when].nullable:
        rules[f"after_{when}_null"] = Seq(columns(w + 1, {}, "null"))
        alts.append(Seq([Lit("<null>"), Ref(f"after_{when}_null")]))
    rules["root"] = Seq(prefix + [one(alts)])
    return rules, left_out


def to_ebnf(rules: dict) -> str:
    return "".join(f"{name} ::= {ebnf(node)}\n" for name, node in rules.items())


# ---- token rows to feed every library ------------------------------------------------------
def valid_rows(tok: SchemaTokenizer, n: int, seed: int) -> torch.Tensor:
    """n records decoded by our tokenizer from random logits: valid under every decode constraint."""
    g = torch.Generator().manual_seed(seed)
    state, out = tok.init_state(n), []
    for t in range(tok.length):
        logits = torch.randn(n, tok.vocab_size, generator=g).masked_fill(~tok.allowed(t, state), float("-inf"))
        nxt = logits.argmax(-1)
        state = tok.advance(t, state, nxt)
        out.append(nxt)
    return torch.stack(out, 1)


def unpack(bitmask: torch.Tensor, V: int) -> torch.Tensor:
    idx = torch.arange(V)
    return ((bitmask[:, idx // 32] >> (idx % 32)) & 1).bool()


# ---- runners -------------------------------------------------------------------------------
def time_ours(tok: SchemaTokenizer, B: int, records: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(records):
        logits = [torch.randn(B, tok.vocab_size, generator=g) for _ in range(tok.length)]
        mask_s = acc_s = app_s = 0.0
        steps = []
        a = perf()
        state = tok.init_state(B)
        setup = perf() - a
        for t in range(tok.length):
            a = perf()
            m = tok.allowed(t, state)
            b = perf()
            lg = logits[t].masked_fill(~m, float("-inf"))
            c = perf()
            nxt = lg.argmax(-1)  # sampling: not timed
            d = perf()
            state = tok.advance(t, state, nxt)
            e = perf()
            mask_s, app_s, acc_s = mask_s + b - a, app_s + c - b, acc_s + e - d
            steps.append(b - a + e - d)
        out.append({"setup_s": setup, "mask_s": mask_s, "accept_s": acc_s, "apply_s": app_s,
                    "max_step_s": max(steps), "rejected": 0})
    return out


class Lib:
    """One library's matcher set for a batch: setup(B), fill(bitmask), accept(tokens) -> #rejected."""
    name = ""
    enforces = ""

    def setup(self, B: int): ...

    def fill(self, bm: torch.Tensor): ...

    def accept(self, tokens: list[int]) -> int: ...


class XgrLoop(Lib):
    def __init__(self, xgr, compiled):
        self.xgr, self.compiled = xgr, compiled

    def setup(self, B):
        self.ms = [self.xgr.GrammarMatcher(self.compiled, terminate_without_stop_token=True) for _ in range(B)]

    def fill(self, bm):
        for i, m in enumerate(self.ms):
            m.fill_next_token_bitmask(bm, i)

    def accept(self, tokens):
        return sum(not m.accept_token(t) for m, t in zip(self.ms, tokens))


class XgrBatch(XgrLoop):
    def __init__(self, xgr, compiled, threads):
        super().__init__(xgr, compiled)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def fill(self, bm):
        self.batch.batch_fill_next_token_bitmask(self.ms, bm)

    def accept(self, tokens):
        return len(tokens) - sum(self.xgr.BatchGrammarMatcher.batch_accept_token(self.ms, tokens))


class OutlinesLoop(Lib):
    def __init__(self, oc, index):
        self.oc, self.index = oc, index

    def setup(self, B):
        self.gs = [self.oc.Guide(self.index) for _ in range(B)]

    def fill(self, bm):
        ptr, n, stride = bm.data_ptr(), bm.shape[1], bm.stride(0) * 4
        for i, g in enumerate(self.gs):
            g.write_mask_into(ptr + i * stride, n, 4)

    def accept(self, tokens):
        rej = 0
        for g, t in zip(self.gs, tokens):
            try:
                g.advance(t, return_tokens=False)
            except Exception:  # outlines-core raises on a token the guide does not allow
                rej += 1
        return rej


class LlgLoop(Lib):
    def __init__(self, template):
        self.template = template

    def setup(self, B):
        self.ms = [self.template.deep_copy() for _ in range(B)]

    def fill(self, bm):
        nbytes, stride = bm.shape[1] * 4, bm.stride(0) * 4
        ptr = bm.data_ptr()
        for i, m in enumerate(self.ms):
            m.unsafe_compute_mask_ptr(ptr + i * stride, nbytes)

    def accept(self, tokens):
        return sum(not m.consume_token(t) for m, t in zip(self.ms, tokens))


class LlgBatch(LlgLoop):
    def __init__(self, ll, template, threads):
        super().__init__(template)
        self.ex = ll.LLExecutor(threads)

    def fill(self, bm):
        self.ex.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(self.ms)], bm.data_ptr(), bm.shape[1] * 4,
                                        bm.shape[0])


def time_lib(lib: Lib, apply_bitmask, pool: torch.Tensor, V: int, B: int, records: int, seed: int,
             first: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    L = pool.shape[1]
    bm = torch.full((B, math.ceil(V / 32)), -1, dtype=torch.int32)
    out = []
    for r in range(records):
        start = ((first + r) * B) % pool.shape[0]
        ids = pool[start:start + B]
        cols = [ids[:, t].tolist() for t in range(L)]
        logits = [torch.randn(B, V, generator=g) for _ in range(L)]
        a = perf()
        lib.setup(B)
        setup = perf() - a
        mask_s = acc_s = app_s = 0.0
        rejected, steps = 0, []
        for t in range(L):
            a = perf()
            lib.fill(bm)
            b = perf()
            rejected += lib.accept(cols[t])
            c = perf()
            apply_bitmask(logits[t], bm)
            d = perf()
            mask_s, acc_s, app_s = mask_s + b - a, acc_s + c - b, app_s + d - c
            steps.append(c - a)
        out.append({"setup_s": setup, "mask_s": mask_s, "accept_s": acc_s, "apply_s": app_s,
                    "max_step_s": max(steps), "rejected": rejected})
    return out


def validate(tok: SchemaTokenizer, lib: Lib, pool: torch.Tensor) -> dict:
    """Step through `pool` rows with our tokenizer and the library side by side and compare masks."""
    B, V = pool.shape[0], tok.vocab_size
    bm = torch.full((B, math.ceil(V / 32)), -1, dtype=torch.int32)
    lib.setup(B)
    state = tok.init_state(B)
    ours_not_theirs = theirs_not_ours = equal = rejected = 0
    for t in range(tok.length):
        ours = tok.allowed(t, state)
        lib.fill(bm)
        theirs = unpack(bm, V)
        ours_not_theirs += int((ours & ~theirs).any(1).sum())
        theirs_not_ours += int((theirs & ~ours).any(1).sum())
        equal += int((ours == theirs).all(1).sum())
        rejected += lib.accept(pool[:, t].tolist())
        state = tok.advance(t, state, pool[:, t])
    n = B * tok.length
    return {"row_steps": n, "equal_masks": equal, "ours_allows_more": ours_not_theirs,
            "library_allows_more": theirs_not_ours, "sampled_tokens_rejected": rejected}


def summarize(runs: list[dict], L: int, B: int) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("setup_s", "mask_s", "accept_s", "apply_s", "max_step_s")}
    per_step = {k.replace("_s", "_ms_per_step"): round(med[k] / L * 1e3, 4) for k in ("mask_s", "accept_s", "apply_s")}
    total_step = (med["mask_s"] + med["accept_s"] + med["apply_s"]) / L
    batches = math.ceil(N_RECORDS / B)
    return {"B": B, "records_timed": len(runs), **per_step,
            "mask_plus_accept_ms_per_step": round((med["mask_s"] + med["accept_s"]) / L * 1e3, 4),
            "worst_step_ms": round(med["max_step_s"] * 1e3, 4), "setup_ms_per_record": round(med["setup_s"] * 1e3, 3),
            "projected_s_per_100k": round(batches * (med["setup_s"] + L * total_step), 2),
            "rejected_tokens": sum(r["rejected"] for r in runs)}


def version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def median_time(fn, n=3):
    ts, val = [], None
    for _ in range(n):
        a = perf()
        val = fn()
        ts.append(perf() - a)
    return statistics.median(ts), val


def err(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="finance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the pipeline decodes
    info = machine_info()
    info["nproc"] = info["cores"]
    rec_ours = {1: 400, 100: 120, 2000: 33} if not args.quick else {1: 6, 100: 4, 2000: 2}
    rec_lib = {1: 200, 100: 40, 2000: 11} if not args.quick else {1: 3, 100: 2, 2000: 1}

    d = load_domain(args.domain)
    build_s, tok = median_time(lambda: SchemaTokenizer(d.spec, d.spec.generated_names, d.decode_constraints))
    V, L = tok.vocab_size, tok.length
    vocab = vocab_strings(tok)
    rules, left_out = build_grammar(tok, d.decode_constraints)
    grammar_ebnf = to_ebnf(rules)
    grammar_regex = regex(rules["root"], rules)
    pool = valid_rows(tok, 4000, args.seed)
    check_rows = pool[:500]
    print(f"vocab {V}, record length {L}, EBNF {len(grammar_ebnf)} chars, regex {len(grammar_regex)} chars", flush=True)

    ours_enforces = ("column order, categorical values, nullability, exact numeric ranges, joint nullability by "
                     "application_type, rate band by sub_grade, AtMost/AtLeast between columns (all 15 decode constraints)")
    lib_enforces = (f"same grammar: column order, categorical values, nullability, exact numeric ranges (fixed-width "
                    f"digit ranges), joint nullability by application_type, rate band by sub_grade; NOT the "
                    f"{len(left_out)} AtMost/AtLeast comparisons")
    libs, compile_info, errors = {}, {"ours SchemaTokenizer": {"build_s": round(build_s, 4)}}, {}

    # xgrammar
    apply_bitmask = None
    try:
        import xgrammar as xgr

        def compile_xgr():
            ti = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, stop_token_ids=[BOS])
            return xgr.GrammarCompiler(ti, max_threads=1, cache_enabled=False).compile_grammar(grammar_ebnf)

        t_compile, compiled = median_time(compile_xgr)
        compile_info["xgrammar"] = {"compile_s": round(t_compile, 4),
                                    "note": "TokenizerInfo + GrammarCompiler(max_threads=1).compile_grammar(EBNF)"}
        libs["xgrammar GrammarMatcher per row"] = XgrLoop(xgr, compiled)
        libs["xgrammar BatchGrammarMatcher, 1 thread"] = XgrBatch(xgr, compiled, 1)
        libs["xgrammar BatchGrammarMatcher, 2 threads"] = XgrBatch(xgr, compiled, 2)

        def apply_bitmask(logits, bm):
            xgr.apply_token_bitmask_inplace(logits, bm, vocab_size=V)
    except Exception as e:  # recorded verbatim
        errors["xgrammar"] = err(e)
    if apply_bitmask is None:
        def apply_bitmask(logits, bm):
            logits.masked_fill_(~unpack(bm, V), float("-inf"))

    # outlines-core (regex -> DFA index over our vocabulary; no hub download)
    try:
        import outlines_core as oc

        def compile_oc():
            voc = oc.Vocabulary(BOS, {s: [i] for i, s in enumerate(vocab) if i != BOS})
            return oc.Index(grammar_regex, voc)

        t_compile, index = median_time(compile_oc)
        compile_info["outlines-core"] = {"compile_s": round(t_compile, 4), "note": "Vocabulary + Index(regex)"}
        libs["outlines-core Guide per row"] = OutlinesLoop(oc, index)
    except Exception as e:
        errors["outlines-core"] = err(e)

    # llguidance (our vocabulary through its TokenizerWrapper; no_forcing: our tokens are not byte-complete)
    try:
        import llguidance as ll

        class _Vocab:
            eos_token_id, bos_token_id, special_token_ids = BOS, None, [BOS]
            tokens = [s.encode() for s in vocab]

            def __call__(self, s):
                raise RuntimeError("not needed with no_forcing")

        lark = '%llguidance {"no_forcing": true}\nstart: /' + grammar_regex.replace("/", "\\/") + "/\n"

        def compile_ll():
            t = ll.LLTokenizer(ll.TokenizerWrapper(_Vocab()))
            m = ll.LLMatcher(t, ll.LLMatcher.grammar_from_lark(lark), log_level=1)
            if m.is_error():
                raise RuntimeError(m.get_error())
            return m

        t_compile, template = median_time(compile_ll)
        compile_info["llguidance"] = {"compile_s": round(t_compile, 4),
                                      "note": "LLTokenizer + LLMatcher(lark with the regex); rows are deep_copy()s"}
        libs["llguidance LLMatcher per row"] = LlgLoop(template)
        libs["llguidance LLExecutor, 1 thread"] = LlgBatch(ll, template, 1)
    except Exception as e:
        errors["llguidance"] = err(e)

    # equivalence check: our mask must be a subset of the library's on every (row, step)
    validation = {}
    for name, lib in list(libs.items()):
        try:
            validation[name] = validate(tok, lib, check_rows)
            print(name, validation[name], flush=True)
        except Exception as e:
            errors[name] = err(e)
            del libs[name]

    # Records of every configuration are interleaved round by round, so a change in the machine's load
    # (a training job shares it) hits all of them alike.
    rows = []
    for B in BATCHES:
        rounds = rec_lib[B]
        runs = {"ours SchemaTokenizer": []} | {name: [] for name in libs}
        for r in range(rounds):
            gc.collect()  # once per round (0.17 s here), outside the timed records
            k = rec_ours[B] // rounds
            runs["ours SchemaTokenizer"] += time_ours(tok, B, k, args.seed + 1000 * B + r)
            for name, lib in libs.items():
                if name in runs:
                    try:
                        runs[name] += time_lib(lib, apply_bitmask, pool, V, B, 1, args.seed + 1000 * B + r, first=r)
                    except Exception as e:
                        errors[f"{name} B={B}"] = err(e)
                        del runs[name]
        for name, rs in runs.items():
            rows.append({"library": name, "enforces": ours_enforces if name.startswith("ours") else lib_enforces,
                         **summarize(rs, L, B)})
            print({k: v for k, v in rows[-1].items() if k != "enforces"}, flush=True)

    # ---- report ----
    at = {r["library"]: r for r in rows if r["B"] == 2000}
    ours = at["ours SchemaTokenizer"]
    others = {k: v for k, v in at.items() if k != "ours SchemaTokenizer"}
    best = min(others, key=lambda k: others[k]["mask_plus_accept_ms_per_step"]) if others else None
    command = "nice -n 5 python benchmarks/mask_libraries.py " + " ".join(sys.argv[1:])
    versions = {p: version(p) for p in ("torch", "xgrammar", "outlines-core", "llguidance")}
    result = {"machine": info, "command": command.strip(), "versions": versions, "domain": args.domain,
              "vocab_size": V, "record_length": L, "n_records_target": N_RECORDS,
              "compile": compile_info, "validation": validation, "errors": errors, "rows": rows,
              "grammar": {"ebnf": grammar_ebnf, "regex_chars": len(grammar_regex),
                          "left_out": [repr(c) for c in left_out]}}
    if best:
        result["ratio_at_2000"] = {"best_library": best,
                                   "mask_ratio": round(others[best]["mask_ms_per_step"] / ours["mask_ms_per_step"], 2),
                                   "mask_plus_accept_ratio": round(others[best]["mask_plus_accept_ms_per_step"]
                                                                   / ours["mask_plus_accept_ms_per_step"], 2)}
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "mask_libraries.json").write_text(json.dumps(result, indent=1))

    md = header("Token-mask cost per decode step: SchemaTokenizer vs structured-generation libraries",
                command.strip(), info)
    md += ("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n"
           f"- domain {args.domain}: vocabulary {V} tokens, a record is {L} decode steps; torch.set_num_threads(1)\n\n"
           "Each row: B rows decoded in lockstep for a whole record; per-step numbers are the record's total divided "
           f"by {L} steps, median over the records timed. *mask* = producing the next-token mask (ours: "
           "`allowed`, a [B, V] bool tensor; libraries: filling an int32 bitmask [B, ceil(V/32)]); *accept* = "
           "telling the matcher the sampled token (ours: `advance`); *apply* = masking float logits [B, V] "
           "(ours: `masked_fill(~mask)`; libraries: `xgrammar.apply_token_bitmask_inplace`, CPU kernel); *setup* = "
           "creating B fresh matchers for a record (ours: `init_state`). The projection is mask-side seconds for "
           f"{N_RECORDS:,} records: ceil(100000/B) x (setup + {L} x (mask + accept + apply)). Timed tokens are valid "
           "rows decoded by our tokenizer from random logits.\n\n")
    md += "## Compile / build (median of 3)\n\n| library | seconds | what |\n|---|---|---|\n"
    for k, v in compile_info.items():
        md += f"| {k} | {v.get('compile_s', v.get('build_s'))} | {v.get('note', 'SchemaTokenizer(...) with constraints')} |\n"
    md += ("\n## Per-step cost\n\n| library | B | mask ms/step | accept ms/step | mask+accept ms/step | apply ms/step "
           "| setup ms/record | s per 100k records (mask side) | records timed | enforces |\n"
           "|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        md += (f"| {r['library']} | {r['B']} | {r['mask_ms_per_step']} | {r['accept_ms_per_step']} | "
               f"{r['mask_plus_accept_ms_per_step']} | {r['apply_ms_per_step']} | {r['setup_ms_per_record']} | "
               f"{r['projected_s_per_100k']} | {r['records_timed']} | {short_enforces(r['library'])} |\n")
    md += ("\n## What each enforces\n\n| library | enforces |\n|---|---|\n"
           f"| ours SchemaTokenizer | {ours_enforces} |\n| xgrammar, outlines-core, llguidance | {lib_enforces} |\n\n"
           "Left out of the library grammar (a comparison between two decoded numbers is not context-free-practical: "
           "it would need one branch per value of the first column): " + "; ".join(f"`{c!r}`" for c in left_out)
           + ".\n\n## Equivalence check\n\nOn 500 rows x every step, our mask compared with each library's "
           "(our mask is stricter only where the AtMost/AtLeast comparisons apply):\n\n"
           "| library | row-steps | identical masks | ours allows a token the library forbids | library allows more "
           "| sampled tokens rejected |\n|---|---|---|---|---|---|\n")
    for k, v in validation.items():
        md += (f"| {k} | {v['row_steps']} | {v['equal_masks']} | {v['ours_allows_more']} | {v['library_allows_more']} "
               f"| {v['sampled_tokens_rejected']} |\n")
    if errors:
        md += "\n## Errors (verbatim)\n\n" + "".join(f"- {k}: `{v}`\n" for k, v in errors.items())
    if best:
        md += "\n## Conclusion\n\n" + conclusion(rows, result, best, validation, len(left_out)) + "\n"
    (REPORTS / "mask_libraries.md").write_text(md)
    print(md)


def short_enforces(name: str) -> str:
    return "schema + all decode constraints" if name.startswith("ours") else \
        "same grammar: schema + nullability/rate-band constraints, not AtMost/AtLeast"


def at_b(rows, B, name):
    return next((r for r in rows if r["B"] == B and r["library"] == name), None)


def conclusion(rows, result, best, validation, n_left_out) -> str:
    """3-5 sentences written from the measured numbers (no verdict is hard-coded)."""
    ours, lib = at_b(rows, 2000, "ours SchemaTokenizer"), at_b(rows, 2000, best)
    rr = result["ratio_at_2000"]
    budget = 600.0
    faster = lambda r: f"{round(r, 1)}x slower than ours" if r >= 1 else f"{round(1 / r, 1)}x faster than ours"
    o1, l1 = at_b(rows, 1, "ours SchemaTokenizer"), at_b(rows, 1, best)
    share = lib["projected_s_per_100k"] / budget
    strict = validation.get(best, {})
    text = (f"At B=2000 our SchemaTokenizer takes {ours['mask_ms_per_step']} ms/step for the mask and "
            f"{ours['mask_plus_accept_ms_per_step']} ms/step with `advance`; the fastest library configuration, "
            f"{best}, takes {lib['mask_ms_per_step']} and {lib['mask_plus_accept_ms_per_step']} ms/step, i.e. "
            f"{faster(rr['mask_ratio'])} for the mask alone and {faster(rr['mask_plus_accept_ratio'])} for "
            f"mask+accept (ratio library/ours = {rr['mask_ratio']} and {rr['mask_plus_accept_ratio']}). ")
    if o1 and l1:
        text += (f"At B=1 it is {o1['mask_plus_accept_ms_per_step']} ms/step (ours) vs "
                 f"{l1['mask_plus_accept_ms_per_step']} ms/step ({best}): ours pays a fixed overhead of tensor ops per "
                 f"step (so it loses at small B) and grows {ours['mask_plus_accept_ms_per_step'] / o1['mask_plus_accept_ms_per_step']:.0f}x "
                 f"from B=1 to B=2000, the library "
                 f"{lib['mask_plus_accept_ms_per_step'] / l1['mask_plus_accept_ms_per_step']:.0f}x (a matcher walk per row). ")
    text += (f"Projected over {N_RECORDS:,} records in batches of 2000 the mask side (mask, accept, apply, setup) "
             f"costs {ours['projected_s_per_100k']} s for ours and {lib['projected_s_per_100k']} s for {best} "
             f"(applying its int32 bitmask to the logits costs {lib['apply_ms_per_step']} ms/step against "
             f"{ours['apply_ms_per_step']} for our bool mask), "
             f"{share:.0%} of the 600 s budget (ours: {ours['projected_s_per_100k'] / budget:.0%}), so on speed alone "
             "the library "
             + ("would also fit the target, leaving the rest of the budget to the model. "
                if share <= 0.1 else "would take a large share of the budget that the model needs. ")
             + f"What it cannot do is the {n_left_out} AtMost/AtLeast comparisons between two decoded numbers "
             f"(no practical grammar for them): on the check rows our mask was stricter on "
             f"{strict.get('library_allows_more', 'n/a')} of {strict.get('row_steps', 'n/a')} row-steps and never "
             f"looser ({strict.get('ours_allows_more', 'n/a')}), so adopting a library would still need our own "
             "tensor mask for those on top of its bitmask.")
    return text


if __name__ == "__main__":
    main()
