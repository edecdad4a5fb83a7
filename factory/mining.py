"""Rule mining: propose the relations a real table obeys, as constraints (schemas/constraints.py).

`mine(frame)` looks for rules that hold on 100% of the given rows (the train split) and have
enough support not to be chance:
- functional dependencies: a code and its label, a sub-category and its category, a prefix of
  another column (`Determines`: the target can be derived);
- ordering between numeric columns, a <= b (`AtMost` / `AtLeast`, oriented so that the column
  written later is the bounded one);
- null patterns: B is null exactly when A is null or takes certain values (`MustBeNull` and
  `MustNotBeNull`, each mined with its own support and test, null usable as a condition value;
  a hand-written domain can state both directions as one `NullExactlyWhen`);
- category implications, A = x => B in S (`Implies`, among columns with few categories);
- sums and differences, c = a + b, c = a - b, c = a + b + d, and c = a, within a cent (`SumOf`:
  the target, the column written last, can be derived);
- ranges: each numeric column's observed [min, max] (`Range`), when narrower than the spec's;
- bands: a numeric column's range per value of a category (`RangeBy`, e.g. a rate band per
  sub-grade, a zero balance for settled loans), for the values whose band is at most
  `max_band_share` of the width of the column's middle 90%.

False discoveries: a rule needs `min_support` rows that test it non-trivially (see `support` of
each kind), and is dropped when a randomly shuffled copy of the column it depends on passes it
too (a permutation test, `shuffles` seeded copies; a range has no second column and is exempt:
it is descriptive by construction). Work is capped so that a 10k x 30 table mines in seconds on
one core: implications only among columns with at most `max_categories` values, dependencies
only from sources with fewer distinct values than half the rows, sums checked on a sample of
rows before the whole table, three-term sums only among at most 40 numeric columns. Deterministic per seed.

The engine is domain-agnostic: only the frame (and optionally its TableSpec) is read.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from schemas.columns import Categorical, Numeric, TableSpec
from schemas.constraints import (AtLeast, AtMost, Determines, Implies, MustBeNull, MustNotBeNull, Range, RangeBy,
                                 SumOf)

MAX_TRIPLE_SUM_COLUMNS = 40  # sums of three terms are looked for only among at most this many numeric columns
KINDS = ("functional_dependency", "ordering", "null_pattern", "implication", "sum", "range", "range_by")


@dataclass
class MinedRule:
    """One mined relation: its constraint (which yields the rule and the decode mask), the rows that
    test it non-trivially, and the column it determines (to derive), if any."""

    constraint: object
    name: str
    message: str
    kind: str
    support: int
    determines: str | None = None

    def rule(self):
        from factory.rules import Rule

        return Rule(self.name, self.message, self.constraint.rule().expr)

    def pass_rate(self, frame: pl.DataFrame) -> float:
        if frame.height == 0:
            return 1.0
        return float(frame.select(self.constraint.rule().expr.fill_null(False).mean()).item())

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "support": self.support, "determines": self.determines,
                "message": self.message, "constraint": self.constraint.to_json()}


def _stable_seed(seed: int, text: str) -> list[int]:
    return [seed, int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)]


class _Miner:
    def __init__(self, frame: pl.DataFrame, spec: TableSpec | None, min_support: int, seed: int,
                 max_categories: int, shuffles: int, tol: float | None, alpha: float, min_violation: float):
        self.df, self.spec, self.n = frame, spec, frame.height
        self.min_support, self.seed, self.max_categories, self.shuffles = min_support, seed, max_categories, shuffles
        self.tol, self.alpha, self.min_violation = tol, alpha, min_violation
        if spec is not None:
            self.order = [c.name for c in spec.columns if c.name in frame.columns]
            self.cat = [n for n in self.order if isinstance(spec[n], Categorical)]
            self.num = [n for n in self.order if isinstance(spec[n], Numeric)]
        else:
            self.order = list(frame.columns)
            self.cat, self.num = [], []
            for n, dt in frame.schema.items():
                if dt in (pl.String, pl.Boolean, pl.Categorical) or isinstance(dt, pl.Enum):
                    self.cat.append(n)
                elif dt.is_integer() and frame[n].n_unique() <= max_categories:
                    self.cat.append(n)
                elif dt.is_numeric():
                    self.num.append(n)
        self.pos = {n: i for i, n in enumerate(self.order)}
        self.nunique = {n: frame[n].n_unique() for n in self.order}  # null counts as a value
        # an ID-like column (unique per row) tells nothing about another column
        self.cat = [n for n in self.cat if self.nunique[n] < max(2, self.n)]
        self.nulls = {n: frame[n].null_count() for n in self.order}
        self.found: list[MinedRule] = []
        self.fd_pairs: set[tuple[str, str]] = set()
        self.sum_sets: list[set[str]] = []

    # ---- bookkeeping ---------------------------------------------------------------------------
    def passes(self, expr: pl.Expr, frame: pl.DataFrame | None = None) -> bool:
        return bool((self.df if frame is None else frame).select(expr.fill_null(False).all()).item())

    def shuffled_violations(self, c, shuffle: str) -> float:
        """The smallest share of rows that break the rule when column `shuffle` is randomly
        permuted (over `shuffles` seeded permutations): 0 means a shuffled copy passes it too."""
        expr = c.rule().expr.fill_null(False)
        worst = 1.0
        for k in range(self.shuffles):
            rng = np.random.default_rng(_stable_seed(self.seed + k, c.rule().name))
            shuffled = self.df.with_columns(self.df[shuffle].gather(rng.permutation(self.n)))
            worst = min(worst, 1.0 - float(shuffled.select(expr.mean()).item()))
        return worst

    def add(self, c, kind: str, support: int, shuffle: str | None, min_violation: float = 0.0,
            p_value: float | None = None) -> bool:
        """Keep `c` if it holds on every row, has the support, is unlikely by chance (`p_value`, the
        exact probability that a random permutation passes, below alpha) and a shuffled copy of
        column `shuffle` breaks it on more than `min_violation` of the rows."""
        if support < self.min_support or not self.passes(c.rule().expr):
            return False
        if p_value is not None and p_value > self.alpha:
            return False
        if shuffle is not None and self.shuffled_violations(c, shuffle) <= min_violation:
            return False
        r = c.rule()
        self.found.append(MinedRule(c, r.name, r.message, kind, int(support), c.determines))
        return True

    def p_exclusion(self, group: int, excluded: int) -> float:
        """Chance that `group` rows drawn at random (without replacement) from the table miss all
        `excluded` rows: C(n - excluded, group) / C(n, group), the permutation test's exact p."""
        n = self.n
        if group + excluded > n:
            return 0.0
        lg = math.lgamma
        return math.exp(lg(n - excluded + 1) - lg(n - excluded - group + 1) - lg(n + 1) + lg(n - group + 1))

    # ---- functional dependencies ---------------------------------------------------------------
    def dependencies(self):
        cols = [n for n in self.cat if self.nunique[n] <= max(2, self.n // 2)]
        pair_unique = {}
        for a, b in itertools.permutations(cols, 2):
            if self.nunique[b] < 2 or self.nunique[a] < self.nunique[b]:
                continue  # a constant, or a source with fewer values than its target, determines nothing
            k = pair_unique.setdefault(frozenset((a, b)), self.df.select(pl.struct(a, b).n_unique()).item())
            if k == self.nunique[a]:
                self.fd_pairs.add((a, b))
        # one direction for a 1:1 pair (the later column is derived from the earlier), and drop
        # a -> c when a -> b -> c (c is then already determined through b)
        keep = set()
        for a, b in self.fd_pairs:
            if (b, a) in self.fd_pairs and self.pos[a] > self.pos[b]:
                continue
            if any((a, m) in self.fd_pairs and (m, b) in self.fd_pairs and m not in (a, b)
                   and not ((m, a) in self.fd_pairs) for m in cols):
                continue
            keep.add((a, b))
        taken = set()
        for a, b in sorted(keep, key=lambda p: (self.pos[p[1]], self.pos[p[0]])):
            if b in taken:
                continue  # one derivation per column
            groups = self.df.group_by(a).agg(pl.col(b).first(), pl.len())
            support = int(groups.filter(pl.col("len") > 1)["len"].sum())  # singleton values test nothing
            c = self._dependency(a, b, groups)
            if self.add(c, "functional_dependency", support, shuffle=a):
                taken.add(b)

    def _dependency(self, a: str, b: str, groups: pl.DataFrame) -> Determines:
        if self.df.schema[a] == pl.String and self.df.schema[b] == pl.String:
            lengths = self.df[b].drop_nulls().str.len_chars().unique()
            if lengths.len() == 1:
                k = int(lengths[0])
                c = Determines(a, b, prefix=k)
                if self.passes(c.rule().expr):
                    return c
        mapping = dict(zip(groups[a].to_list(), groups[b].to_list()))
        return Determines(a, b, dict(sorted(mapping.items(), key=lambda kv: (kv[0] is None, str(kv[0])))))

    # ---- sums and identities ---------------------------------------------------------------------
    def sums(self):
        num = [n for n in self.num if self.nunique[n] > 1]
        if len(num) < 2:
            return
        X = self.df.select(pl.col(num).cast(pl.Float64)).to_numpy()
        present = ~np.isnan(X)
        decimals = {n: (self.spec[n].decimals if self.spec is not None else self._decimals(n)) for n in num}
        rng = np.random.default_rng(self.seed)
        probe = rng.choice(self.n, size=min(self.n, 256), replace=False)
        P, Pp = X[probe], present[probe]
        idx = {n: i for i, n in enumerate(num)}
        seen: list[frozenset] = []

        def tol_for(cols):
            if self.tol is not None:
                return self.tol
            d = max(decimals[c] for c in cols)
            return (10.0 ** -d if d > 0 else 0.0) + 1e-6  # within a cent for 2 decimals; exact for integers

        def candidates(terms, signs):
            s = sum(sg * P[:, idx[t]] for t, sg in zip(terms, signs))
            ok_rows = Pp[:, [idx[t] for t in terms]].all(1)
            if ok_rows.sum() < min(len(probe), 8):
                return []
            out = []
            for c in num:
                if c in terms:
                    continue
                both = ok_rows & Pp[:, idx[c]]
                if both.sum() == 0:
                    continue
                if np.all(np.abs(P[both, idx[c]] - s[both]) <= tol_for(list(terms) + [c])):
                    out.append(c)
            return out

        combos = [((a,), (1,)) for a in num]
        combos += [((a, b), sg) for a, b in itertools.combinations(num, 2) for sg in ((1, 1), (1, -1), (-1, 1))]
        if len(num) <= MAX_TRIPLE_SUM_COLUMNS:  # a + b + d = c: cubic in the columns, so capped
            combos += [(t, (1, 1, 1)) for t in itertools.combinations(num, 3)]
        for terms, signs in combos:
            for target in candidates(terms, signs):
                cols = frozenset(terms) | {target}
                if any(cols >= s for s in seen):
                    continue  # already found (or a wider sum containing a found one)
                # write it with the column generated last as the target (it is then derived)
                last = max(cols, key=self.pos.get)
                if last in self.derived:
                    continue  # already derived by a dependency
                if last != target:
                    coef = {t: sg for t, sg in zip(terms, signs)} | {target: -1}
                    flip = -coef[last]  # last = sum(coef_t * t) / -coef_last over the others
                    new_terms = tuple(t for t in sorted(cols - {last}, key=self.pos.get))
                    terms_, signs_ = new_terms, tuple(int(coef[t] * flip) for t in new_terms)
                    if signs_[0] < 0 and len(signs_) > 1 and all(s > 0 for s in signs_[1:]):
                        terms_ = terms_[1:] + terms_[:1]
                        signs_ = signs_[1:] + signs_[:1]
                else:
                    terms_, signs_ = tuple(terms), tuple(signs)
                if signs_[0] < 0:
                    continue  # -a + ... : written another way in this loop
                c = SumOf(last, terms_, signs_, tol=tol_for(list(cols)), decimals=decimals[last])
                rows = int(self.df.select(pl.all_horizontal(pl.col(sorted(cols)).is_not_null()).sum()).item())
                if self.add(c, "sum", rows, shuffle=terms_[0]):
                    seen.append(cols)
                    self.sum_sets.append(set(cols))

    def _decimals(self, n: str) -> int:
        s = self.df[n].drop_nulls()
        if s.dtype.is_integer():
            return 0
        for k in range(7):
            if ((s - s.round(k)).abs() < 1e-9).all():
                return k
        return 7

    # ---- ordering --------------------------------------------------------------------------------
    def orderings(self):
        num = [n for n in self.num if self.nunique[n] > 1]
        for a, b in itertools.combinations(num, 2):
            if any({a, b} <= s for s in self.sum_sets):
                continue  # implied by a sum that derives one of them
            sub = self.df.select(a, b).drop_nulls()
            if sub.height < self.min_support:
                continue
            x, y = sub[a].cast(pl.Float64).to_numpy(), sub[b].cast(pl.Float64).to_numpy()
            if np.array_equal(x, y):
                continue  # an identity: the sum miner writes it as SumOf
            for lo, hi, xs, ys in ((a, b, x, y), (b, a, y, x)):  # lo <= hi ?
                if np.all(xs <= ys):
                    later, earlier = (lo, hi) if self.pos[lo] > self.pos[hi] else (hi, lo)
                    c = AtMost(lo, hi) if later == lo else AtLeast(hi, lo)
                    self.add(c, "ordering", int(np.sum(xs != ys)), shuffle=earlier, min_violation=self.min_violation)
                    break

    # ---- null patterns -------------------------------------------------------------------------
    def null_patterns(self, min_group: int = 5, min_expected: float = 3.0):
        best = {}  # (kind, constrained column) -> (preference, constraint, support, condition column, p)
        for b in self.order:
            if not 0 < self.nulls[b] < self.n:
                continue
            for a in self.order:
                if a == b:
                    continue
                if a in self.derived or b in self.derived:
                    continue  # a derived column's nulls follow from its source
                for c, _, p in self._null_candidates(a, b, min_group, min_expected):
                    col, cond = c.column, c.when
                    support = int(self.df.select(c.condition().sum()).item())  # rows the condition holds on
                    key = (type(c).__name__, col)
                    # condition written before the column (maskable), significant, more support, first
                    pref = (self.pos[cond] > self.pos[col], p > self.alpha, -support, self.pos[cond])
                    if key not in best or pref < best[key][0]:
                        if self.passes(c.rule().expr):
                            best[key] = (pref, c, support, cond, p)
        for key in sorted(best, key=lambda k: (self.pos[k[1]], k[0])):
            _, c, support, cond, p = best[key]
            self.add(c, "null_pattern", support, shuffle=cond, p_value=p)

    def _null_candidates(self, a: str, b: str, min_group: int, min_expected: float):
        """(constraint, support, p) for "b null when a in S" and "b present when a in T". A value of
        `a` joins S only if its rows would show a present b `min_expected` times by chance (T: a null b)."""
        bnull = pl.col(b).is_null()
        n_null = self.nulls[b]
        rate = n_null / self.n
        if a in self.cat and self.nunique[a] <= self.max_categories:
            g = self.df.group_by(a).agg(bnull.all().alias("all_null"), (~bnull).all().alias("none_null"),
                                        pl.len()).filter(pl.col("len") >= min_group)
            key = lambda v: (v is None, str(v))  # noqa: E731
            nulls = g.filter(pl.col("all_null") & (pl.col("len") * (1 - rate) >= min_expected))
            present = g.filter(pl.col("none_null") & (pl.col("len") * rate >= min_expected))
            if nulls.height:
                k = int(nulls["len"].sum())
                yield MustBeNull(b, a, tuple(sorted(nulls[a].to_list(), key=key))), k, self.p_exclusion(k, self.n - n_null)
            if present.height:
                k = int(present["len"].sum())
                yield MustNotBeNull(b, a, tuple(sorted(present[a].to_list(), key=key))), k, self.p_exclusion(k, n_null)
        elif 0 < self.nulls[a] < self.n:  # any column: its null / present split
            anull = pl.col(a).is_null()
            r = self.df.select(((anull & ~bnull).sum() == 0).alias("null_then_null"),
                               ((~anull & bnull).sum() == 0).alias("present_then_present"),
                               anull.sum().alias("a_null")).row(0, named=True)
            k = int(r["a_null"])
            later = self.pos[a] > self.pos[b]  # then write the same fact on a (its contrapositive)
            if r["null_then_null"]:  # a null => b null, i.e. b present => a present
                c = MustNotBeNull(a, b, (None,), invert=True) if later else MustBeNull(b, a, (None,))
                yield c, k, self.p_exclusion(k, self.n - n_null)
            if r["present_then_present"]:  # a present => b present, i.e. b null => a null
                c = MustBeNull(a, b, (None,)) if later else MustNotBeNull(b, a, (None,), invert=True)
                yield c, self.n - k, self.p_exclusion(self.n - k, n_null)

    # ---- implications --------------------------------------------------------------------------
    def implications(self, min_group: int = 5, min_expected: float = 3.0):
        cols = [n for n in self.cat if 2 <= self.nunique[n] <= self.max_categories]
        for a, b in itertools.permutations(cols, 2):
            if (a, b) in self.fd_pairs or (b, a) in self.fd_pairs or a in self.derived or b in self.derived:
                continue  # a dependency says more; a derived column's relations follow from its source
            pairs = self.df.group_by(a, b).len()
            b_all = set(self.df[b].unique().to_list())
            by_set: dict[tuple, list] = {}
            support: dict[tuple, int] = {}
            b_count = dict(self.df.group_by(b).len().iter_rows())
            for x, g in pairs.group_by(a):
                x = x[0]
                n_x = int(g["len"].sum())
                # a value of b too rare to be expected among these rows (fewer than min_expected
                # times) is allowed: its absence says nothing
                rare = {v for v, k in b_count.items() if n_x * k / self.n < min_expected}
                seen = tuple(sorted(set(g[b].to_list()) | rare, key=lambda v: (v is None, str(v))))
                if n_x < min_group or set(seen) == b_all or b_all - set(seen) == {None} or set(seen) == {None}:
                    continue  # nothing excluded, or only null: the null patterns say that
                by_set.setdefault(seen, []).append(x)
                support[seen] = support.get(seen, 0) + n_x
            for seen, xs in sorted(by_set.items(), key=lambda kv: str(kv[0])):
                xs = tuple(sorted(xs, key=lambda v: (v is None, str(v))))
                excluded = sum(k for v, k in b_count.items() if v not in seen)
                self.add(Implies(a, xs, b, seen), "implication", support[seen], shuffle=a,
                         p_value=self.p_exclusion(support[seen], excluded))

    # ---- ranges ---------------------------------------------------------------------------------
    def ranges(self):
        for n in self.num:
            s = self.df[n].drop_nulls()
            if s.len() < self.min_support:
                continue
            lo, hi = float(s.min()), float(s.max())
            if self.spec is not None and lo <= self.spec[n].lo and hi >= self.spec[n].hi:
                continue  # the schema's range already says it
            self.add(Range(n, lo, hi), "range", s.len(), shuffle=None)


    # ---- bands: a range per category ----------------------------------------------------------
    def bands(self, min_group: int = 5):
        """B in [lo_v, hi_v] for the values v of A whose rows keep B within `max_band_share` of the
        width of its middle 90% (other values leave B unconstrained): a rate band per sub-grade, a zero balance
        for settled loans. One A per B: the one whose narrow bands cover the most rows."""
        cats = [n for n in self.cat if 2 <= self.nunique[n] <= self.max_categories]
        for b in self.num:
            s = self.df[b].drop_nulls()
            if b in self.derived or s.len() < self.min_support or s.n_unique() < 3:
                continue
            # the middle 90% of the column: a heavy tail (one large income) would make any band look narrow
            width = float(s.quantile(0.95)) - float(s.quantile(0.05)) or float(s.max()) - float(s.min())
            best = None
            for a in cats:
                if a in self.derived:
                    continue
                g = (self.df.filter(pl.col(b).is_not_null()).group_by(a)
                     .agg(pl.col(b).min().alias("lo"), pl.col(b).max().alias("hi"), pl.len())
                     .filter((pl.col("len") >= min_group) & ((pl.col("hi") - pl.col("lo")) <= self.max_band_share * width)))
                covered = int(g["len"].sum())
                if covered < self.min_support:
                    continue
                share = float(((g["hi"] - g["lo"]) * g["len"]).sum()) / covered / width
                if best is None or (covered, -share) > (best[0], -best[1]):
                    key = lambda r: (r[a] is None, str(r[a]))  # noqa: E731
                    bounds = {r[a]: (float(r["lo"]), float(r["hi"])) for r in sorted(g.iter_rows(named=True), key=key)}
                    best = (covered, share, a, bounds)
            if best is not None:
                covered, _, a, bounds = best
                self.add(RangeBy(b, a, bounds), "range_by", covered, shuffle=a, min_violation=self.min_violation)

    @property
    def derived(self) -> set[str]:
        return {r.determines for r in self.found if r.determines}


def mine(frame: pl.DataFrame, spec: TableSpec | None = None, *, min_support: int = 30, seed: int = 0,
         max_categories: int = 50, shuffles: int = 2, tol: float | None = None, alpha: float = 1e-6,
         min_violation: float = 0.01, max_band_share: float = 0.25, min_expected: float = 3.0,
         kinds: tuple[str, ...] = KINDS) -> list[MinedRule]:
    """Rules that hold on every row of `frame` (a train split), with at least `min_support` rows
    testing them non-trivially, that a shuffled copy of their condition column does not also pass.

    `spec` (optional) gives column kinds, decimals and generation order (otherwise: the frame's
    dtypes and column order); a range is proposed only where narrower than the spec's. `tol` is the
    sums' tolerance (default: a unit of the columns' last decimal, e.g. a cent; exact for integers).
    False discoveries: implications and null patterns need an exact permutation p-value below
    `alpha` (the chance that as many random rows all avoid the excluded values); every rule but a
    range is dropped when a shuffled copy of its condition column passes it too; an ordering also
    when that copy breaks it on no more than `min_violation` of the rows (a <= b that follows from
    the two ranges alone, e.g. a count <= a credit limit, says nothing). A category value expected
    fewer than `min_expected` times among a condition's rows is never excluded by an implication
    (its absence says nothing), nor does a condition value join a null pattern on so few rows.
    The result is ordered by kind, then by the constrained column's position."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown rule kind {unknown[0]!r} (known: {', '.join(KINDS)})")
    if frame.height == 0:
        return []
    m = _Miner(frame, spec, min_support, seed, max_categories, shuffles, tol, alpha, min_violation)
    m.max_band_share = max_band_share
    steps = {"functional_dependency": m.dependencies, "sum": m.sums, "ordering": m.orderings,
             "null_pattern": lambda: m.null_patterns(min_expected=min_expected),
             "implication": lambda: m.implications(min_expected=min_expected), "range": m.ranges,
             "range_by": m.bands}
    for kind in ("functional_dependency", "sum", "ordering", "null_pattern", "implication", "range", "range_by"):
        if kind in kinds:
            steps[kind]()
    names: dict[str, int] = {}
    for r in m.found:  # unique names, stable for a given table
        k = names.get(r.name, 0)
        names[r.name] = k + 1
        if k:
            r.name = f"{r.name}_{k + 1}"
    return m.found


def derived_columns(rules: list[MinedRule]) -> dict[str, object]:
    """Column -> the mined constraint that determines it, in an order that computes every derived
    column after the derived columns it reads. The first constraint per column wins, in rule order;
    one that would close a cycle of derivations is left out (it stays a rule)."""
    chosen: dict[str, object] = {}

    def reaches(start: str, goal: str) -> bool:  # does `start` read `goal` through chosen derivations?
        stack, seen = [start], set()
        while stack:
            col = stack.pop()
            if col == goal:
                return True
            if col in seen or col not in chosen:
                continue
            seen.add(col)
            stack.extend(chosen[col].columns[1:])
        return False

    for r in rules:
        col = r.determines
        if col and col not in chosen and not any(reaches(dep, col) for dep in r.constraint.columns[1:]):
            chosen[col] = r.constraint
    out: dict[str, object] = {}

    def place(col: str):
        if col not in out:
            for dep in chosen[col].columns[1:]:
                if dep in chosen:
                    place(dep)
            out[col] = chosen[col]

    for col in chosen:
        place(col)
    return out
