import os

import pytest

from helpers import domains_path

# The test-only `toy` domain (helpers.TOY_DOMAINS) is found the way any external domain is: FACTORY_DOMAINS_PATH.
os.environ["FACTORY_DOMAINS_PATH"] = domains_path()

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
