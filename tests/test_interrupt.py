"""Progress and interruption as a user meets them: the run id is printed first, plain progress lines
appear when output is not a terminal, Ctrl-C (SIGINT) prints the resume command, and that command
completes the run to exactly what an uninterrupted run of the same seed stores."""
import re
import signal

import pytest

from factory.store import Store
from helpers import factory_popen

pytestmark = pytest.mark.slow
ARGS = ("-d", "toy", "-n", 1500, "--model", "baseline", "--batch-size", 40, "--seed", 2, "--allow-drift")


def cli(*args, cwd):
    """`factory ARGS...` as a process, with a progress line for every stored batch."""
    return factory_popen(*args, cwd=cwd, env={"FACTORY_PROGRESS_INTERVAL": "0"})


def records(db, run_id):
    with Store(db, read_only=True) as s:
        return s.frame("SELECT * EXCLUDE (run_id) FROM toy.records WHERE run_id = ? ORDER BY record_id", [run_id])


def test_sigint_prints_the_resume_command_and_resume_completes(tmp_path):
    ref = cli("generate", *ARGS, "-q", "--db", "ref.duckdb", cwd=tmp_path)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]

    p = cli("generate", *ARGS, "--db", "run.duckdb", cwd=tmp_path)
    first = p.stderr.readline()  # printed before the first batch
    run_id = re.match(r"run (toy-\S+) \(database run.duckdb\)", first).group(1)
    progress = p.stderr.readline()  # non-tty: plain lines, one per stored batch at interval 0
    assert re.match(r"generate: [\d,]+ of 1,500 records \([\d.]+%\), [\d,]+ attempts, [\d,]+ records/s, ETA", progress)
    p.send_signal(signal.SIGINT)  # at once: the toy run may otherwise finish first (its batches take ms)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert last == (f"error: interrupted: run {run_id} keeps every batch stored so far; continue it with "
                    f"`factory generate --resume {run_id} --db run.duckdb`")
    assert 0 < records(tmp_path / "run.duckdb", run_id).height < 1500

    r = cli("generate", "--resume", run_id, "--db", "run.duckdb", "-q", "--allow-drift", cwd=tmp_path)
    assert r.wait(timeout=300) == 0, r.stderr.read()[-2000:]
    with Store(tmp_path / "ref.duckdb", read_only=True) as s:
        (ref_id,), = s.frame("SELECT run_id FROM runs").rows()
    assert records(tmp_path / "run.duckdb", run_id).equals(records(tmp_path / "ref.duckdb", ref_id))
