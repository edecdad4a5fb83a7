"""The database opens in the DuckDB CLI that users install (PyPI `duckdb-cli`, the current stable 1.5.x).

DuckDB 2.x writes storage format 69 by default, which that CLI refuses ("can only read versions
between 64 and 68"); the store writes new files in a format both read (STORAGE_COMPATIBILITY)."""
import subprocess
from pathlib import Path

from factory.baseline import MarginalBaseline
from factory.loop import run_generation
from factory.store import Store


def duckdb_cli() -> Path:
    import duckdb_cli  # the test extra installs it; missing means the install is incomplete

    binary = Path(duckdb_cli.__file__).parent / "duckdb"
    assert binary.is_file(), f"duckdb-cli is installed but has no bundled binary at {binary}"
    return binary


def test_duckdb_cli_reads_the_database(toy, tmp_path):
    path = tmp_path / "factory.duckdb"
    with Store(path) as s:
        run_id = run_generation(toy, MarginalBaseline.fit(toy), 25, 0, s, 16, progress=False).run_id
    query = (f"SELECT r.run_id, r.accepted, (SELECT count(*) FROM toy.records) AS records "
             f"FROM runs r ORDER BY started_at DESC LIMIT 1")
    res = subprocess.run([str(duckdb_cli()), "-readonly", "-csv", str(path), "-c", query],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == f"{run_id},25,25"


def test_readme_queries_run_as_written(finance, tmp_path):
    """Every ```sql block of the README runs on a database holding a finance run, and returns rows."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    queries = re.findall(r"```sql\n(.*?)```", readme, flags=re.S)
    assert len(queries) >= 3
    path = tmp_path / "factory.duckdb"
    with Store(path) as s:
        run_generation(finance, MarginalBaseline.fit(finance), 20, 0, s, 500, progress=False, gates=False)
    with Store(path, read_only=True) as s:
        for q in queries:
            assert s.query(q).height > 0, q
