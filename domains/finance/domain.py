"""The finance domain: real Lending Club loans (2018 Q1) and the rules of loan accounting."""
from pathlib import Path

from factory.domain import Domain, load_config

from . import data
from .schema import DECODE_CONSTRAINTS, RULES, SPEC, derive, derived_caps, latents

HERE = Path(__file__).parent

DOMAIN = Domain(
    name="finance",
    root=HERE,
    spec=SPEC,
    rules=RULES,
    derive=derive,
    load_split=data.load_split,
    description="Lending Club personal loans, Jan-Mar 2018 (openintro/loans_full_schema)",
    config=load_config(HERE),
    decode_constraints=DECODE_CONSTRAINTS,
    latents=latents,
    derived_caps=derived_caps,
)
