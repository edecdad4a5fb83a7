"""Reusable check expressions (polars) that domains compose into named rules."""
from __future__ import annotations

import polars as pl


def within(a: pl.Expr, b: pl.Expr, tol: float) -> pl.Expr:
    """|a - b| <= tol; false (not null) when either side is missing."""
    return ((a - b).abs() <= tol).fill_null(False)


def amortized_installment(principal: pl.Expr, annual_rate_pct: pl.Expr, months: pl.Expr) -> pl.Expr:
    """Level monthly payment of a fully amortizing loan: P*r / (1 - (1+r)^-n), r = annual%/1200."""
    r = annual_rate_pct / 1200.0
    return pl.when(r == 0).then(principal / months).otherwise(principal * r / (1 - (1 + r).pow(-months)))


def scheduled_principal(principal: pl.Expr, annual_rate_pct: pl.Expr, months: pl.Expr, payments: pl.Expr) -> pl.Expr:
    """Principal repaid after `payments` level payments of a fully amortizing loan, in cents:
    P * ((1+r)^k - 1) / ((1+r)^n - 1), r = annual%/1200 (P*k/n at r = 0), rounded to 2 decimals."""
    r = annual_rate_pct / 1200.0
    k, n = payments.cast(pl.Float64), months.cast(pl.Float64)
    return (pl.when(r == 0).then(principal * k / n)
            .otherwise(principal * ((1 + r).pow(k) - 1) / ((1 + r).pow(n) - 1))).round(2)
