import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TOY_DOMAINS = TESTS / "domains"

# The test-only `toy` domain is found the way any external domain is: FACTORY_DOMAINS_PATH.
os.environ["FACTORY_DOMAINS_PATH"] = os.pathsep.join(
    p for p in [str(TOY_DOMAINS), os.environ.get("FACTORY_DOMAINS_PATH", "")] if p)

from factory.domain import load_domain  # noqa: E402
from factory.store import Store  # noqa: E402


@pytest.fixture(scope="session")
def finance():
    return load_domain("finance")


@pytest.fixture(scope="session")
def toy():
    return load_domain("toy")


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "test.duckdb") as s:
        yield s
