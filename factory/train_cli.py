"""`factory train`: train a domain's DiffLM stack (registered into the main CLI by factory.cli)."""
from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import typer

TRAIN_DDL = """
CREATE TABLE IF NOT EXISTS train_runs (
    train_id VARCHAR PRIMARY KEY, domain VARCHAR, out_dir VARCHAR, config JSON,
    started_at TIMESTAMP, finished_at TIMESTAMP, status VARCHAR, summary JSON);
CREATE TABLE IF NOT EXISTS train_log (
    train_id VARCHAR, logged_at TIMESTAMP, stage VARCHAR, epoch INTEGER, step INTEGER, metrics JSON);
"""


def progress_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _plan(dom, cfg_dict: dict):
    """The budget plan for this domain's train split (rows) and record length (tokens)."""
    from factory.difflm.budget import plan
    from factory.difflm.tokenizer import SchemaTokenizer

    rows = dom.load_split("train").height
    if cfg_dict.get("max_train_rows"):
        rows = min(rows, cfg_dict["max_train_rows"])
    tokens = SchemaTokenizer(dom.spec, dom.spec.generated_names).length
    minutes = cfg_dict["max_minutes"]
    if not isinstance(minutes, (int, float)) or isinstance(minutes, bool) or minutes <= 0:
        raise ValueError(f"max_minutes must be a positive number, got {minutes!r}")
    return plan(rows, tokens, float(minutes))


def _now():
    return datetime.now(timezone.utc).replace(tzinfo=None)


def train(domain: str, config: Path | None, out: Path | None, resume: bool, db: Path | None, quiet: bool = False,
          device: str | None = None, max_minutes: float | None = None, force: bool = False):
    """`device` (cpu, cuda or auto) overrides the config's `device` (default cpu). `max_minutes` (or the
    settings' `max_minutes`) plans model size, epochs, batch size and rows to fit that budget
    (factory/difflm/budget.py); keys the settings set explicitly keep their values."""
    import duckdb
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from factory.difflm.device import resolve_device
    from factory.difflm.budget import merge
    from factory.difflm.train import TrainConfig, Trainer
    from factory.domain import load_domain

    from factory.difflm.config import read_json_object
    from factory.difflm.train import staging_dir
    from factory.store import Store, StoreError

    dom = load_domain(domain)
    where = str(config) if config else f"{dom.root / 'config.json'}: section train"
    cfg_dict = read_json_object(config) if config else dict(dom.config.get("train", {}))
    if device is not None:
        cfg_dict = {**cfg_dict, "device": device}
    if max_minutes is not None:
        cfg_dict = {**cfg_dict, "max_minutes": max_minutes}
    plan = None
    if cfg_dict.get("max_minutes"):
        plan = _plan(dom, cfg_dict)
        cfg_dict = merge(plan.settings, cfg_dict)
    cfg = TrainConfig.from_dict(cfg_dict, where)
    if plan is not None and not quiet:
        progress_line(f"training plan: {plan.describe()}")
    resolve_device(cfg.device)  # a DeviceError before the run is recorded or any data is loaded
    out = out or dom.model_dir
    if not resume and not force and (Path(out) / "pipeline.json").exists():
        # a trained stack (the shipped one, by default) is never replaced by accident
        raise StoreError(f"{out} already holds a trained stack; train into a new folder with --out DIR (then "
                         f"generate with --model-dir DIR), or pass --force to replace it")
    if resume and not staging_dir(Path(out)).is_dir():
        raise StoreError(f"nothing to resume for {out}: no interrupted training in {staging_dir(Path(out))} "
                         "(a finished training leaves none); train without --resume")
    train_id = f"train-{uuid.uuid4().hex[:12]}"

    def record(sql: str, params: list, ddl: bool = False) -> None:
        """One write to --db, holding the file only for it (a training takes many minutes; readers such
        as `factory sql` and a concurrent `factory generate` can open it in between)."""
        if db is None:
            return
        from factory.store import STORAGE_COMPATIBILITY

        try:
            con = duckdb.connect(str(db), config={"storage_compatibility_version": STORAGE_COMPATIBILITY})
            try:
                if ddl:
                    con.execute(TRAIN_DDL)
                con.execute(sql, params)
            finally:
                con.close()
        except duckdb.Error as e:
            raise StoreError(f"cannot record the training in {db}: {str(e).splitlines()[0]}") from None

    if db is not None:
        Store(db).close()  # a corrupt or foreign database is refused (one line) before training writes to it
    record("INSERT INTO train_runs VALUES (?, ?, ?, ?, ?, NULL, 'running', NULL)",
           [train_id, domain, str(out), json.dumps(cfg_dict), _now()], ddl=True)

    def log(rec: dict):
        record("INSERT INTO train_log VALUES (?, ?, ?, ?, ?, ?)",
               [train_id, _now(), rec.get("stage"), rec.get("epoch"), rec.get("step"), json.dumps(rec)])
        if not quiet and rec.get("stage") != "done":
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}
            if sys.stderr.isatty():
                progress.console.print(shown)
            else:  # one line per record in logs and CI, not a pretty-printed block
                progress_line(json.dumps(shown))

    t = time.time()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=quiet) as progress:
        task = progress.add_task("starting", total=None)

        last = {"desc": None, "t": 0.0}
        piped = not quiet and not sys.stderr.isatty()

        def on_progress(desc: str, done: int, total: int):
            progress.update(task, description=desc, completed=done, total=total)
            # no live bar when output is not a terminal: a plain line per stage, and every 30 s
            now = time.time()
            if piped and (desc != last["desc"] or now - last["t"] >= 30 or done == total):
                if desc != last["desc"] or now - last["t"] >= 30:
                    progress_line(f"{desc}: {done:,}/{total:,} ({(now - t) / 60:.1f} min)")
                    last.update(desc=desc, t=now)

        try:
            summary = Trainer(dom, cfg, out, log=log, progress=on_progress).run(resume=resume)
        except BaseException:
            try:
                record("UPDATE train_runs SET status='failed', finished_at=? WHERE train_id=?", [_now(), train_id])
            except StoreError:
                pass  # the training's own error is the one to report
            raise
    record("UPDATE train_runs SET status='succeeded', finished_at=?, summary=? WHERE train_id=?",
           [_now(), json.dumps(summary), train_id])
    return summary, time.time() - t


def register(app: typer.Typer, fail, user_errors):
    """Add `train` to `app`; `fail` and `user_errors` are the CLI's one-line error helpers (passed in,
    so this module never imports factory.cli back)."""

    @app.command("train")
    def train_cmd(
        domain: str = typer.Option(..., "--domain", "-d", help="domain to train"),
        config: Path = typer.Option(None, "--config", help="JSON training config (default: the domain's config.json 'train' section)"),
        out: Path = typer.Option(None, "--out", help="output folder (default: domains/<name>/model)"),
        resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in --out"),
        force: bool = typer.Option(False, "--force", help="replace the trained stack already in --out (default "
                                   "--out: the domain's model/, e.g. the shipped finance stack)"),
        db: Path = typer.Option(Path("factory.duckdb"), "--db", help="DuckDB file that records the training run and its losses"),
        quiet: bool = typer.Option(False, "--quiet"),
        device: str = typer.Option(None, "--device", help="cpu, cuda or auto (cuda if torch sees a GPU); "
                                   "default: the config's 'device', else cpu"),
        max_minutes: float = typer.Option(None, "--max-minutes", help="time budget: model size, epochs, batch "
                                          "size and rows follow the table's shape to fit it (default: the "
                                          "settings' max_minutes, else none)"),
    ):
        """Train a domain's DiffLM stack (decoder LM, beta-VAE, latent diffusion).

        The stack is built in a staging folder beside --out (.<name>.training, with its
        checkpoints) and renamed into place whole at the end; --resume continues that folder."""
        from factory.difflm.config import ModelError
        from factory.difflm.device import DeviceError
        from factory.domain import DomainError

        if max_minutes is not None and max_minutes <= 0:
            fail(f"--max-minutes must be positive, got {max_minutes:g}")
        try:
            summary, secs = user_errors(train)(domain, config, out, resume, db, quiet, device, max_minutes, force)
        except (DeviceError, ModelError, DomainError) as e:
            fail(str(e))
        typer.echo(f"trained {domain} stack in {secs / 60:.1f} min -> {out or 'domains/' + domain + '/model'}")
