"""``prisp serve``: run the HTTP server, make and rotate store keys, export a user's adapter.

Wired into the main CLI as ``app.add_typer(serve_app, name="serve")``; the bare ``prisp serve --store DIR``
runs the server (the group's callback), the sub-commands manage keys and exports. Heavy imports
(torch, FastAPI, uvicorn) happen inside the commands so ``prisp --help`` stays fast.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from pathlib import Path

import typer

from prisp.console import SCHEDULE_HELP, THREADS_HELP, friendly, resolve_threads
from prisp.errors import PrispError
from prisp.models import DEFAULT_MODEL

serve_app = typer.Typer(help="Serve personalized adapters over HTTP from an encrypted per-user store.",
                        invoke_without_command=True, pretty_exceptions_enable=False, add_completion=False)


_KEY_FILE_HELP = "File holding the base64 store key [default: $PRISP_STORE_KEY]."


@serve_app.callback(invoke_without_command=True)
@friendly
def serve(
    ctx: typer.Context,
    store: Path | None = typer.Option(None, help="Store directory (created on first start)."),
    host: str = typer.Option("127.0.0.1", help="Listen address (keep loopback without a TLS proxy)."),
    port: int = typer.Option(8000, help="Listen port."),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model name or directory."),
    anchor: list[str] = typer.Option([], "--anchor", help="TASK=DIR: a task's anchor LoRA (repeatable)."),
    task_file: list[Path] = typer.Option([], "--task-file", help="A custom task spec (.toml/.json) to serve "
                                                                 "besides the LaMP tasks (repeatable; needs --anchor NAME=DIR)."),
    anchors_dir: Path | None = typer.Option(None, help="One anchor sub-dir per task (LaMP-4 ...)."),
    random_anchors: bool = typer.Option(False, help="Random-init anchors (= base model) elsewhere."),
    hypernet: Path | None = typer.Option(None, help="With no anchor option: the hypernetwork that makes every "
                                                    "task's anchor from its description [default: the shipped one]."),
    key_file: Path | None = typer.Option(None, help=_KEY_FILE_HELP),
    previous_key_file: Path | None = typer.Option(None, help="The key an interrupted rotation started from: given "
                                                             "with the new key, the server finishes the rotation at "
                                                             "start."),
    admin_token_file: Path | None = typer.Option(None, help="The admin token's hash (`prisp serve admin-token "
                                                            "--out FILE`) [default: $PRISP_ADMIN_TOKEN]."),
    open_registration: bool = typer.Option(False, help="Let anyone who reaches the port create users (no admin "
                                                       "token needed)."),
    max_jobs_per_hour: int = typer.Option(30, help="Most personalize/update jobs per user per hour (429 above)."),
    max_adapters: int = typer.Option(16, help="Most tasks a user may hold an adapter for (429 above)."),
    job_timeout_s: float = typer.Option(1800.0, help="A personalization job running longer is reported failed."),
    strategy: str = typer.Option("prisp", help="Stage 2 strategy of personalize/update jobs."),
    schedule: str = typer.Option("paper", help=SCHEDULE_HELP),
    lr: float | None = typer.Option(None, help="Stage 2 learning rate [default: the schedule's for the task]."),
    cache_size: int = typer.Option(64, help="Decrypted adapters kept in memory (LRU)."),
    max_body_bytes: int = typer.Option(1_000_000, help="Largest request body (413 above)."),
    max_items: int = typer.Option(200, help="Most history items per request (413 above)."),
    threads: str | None = typer.Option(None, help=THREADS_HELP),
    batch_window_ms: float = typer.Option(10.0, help="How long a generate request waits to share a batch."),
    max_batch: int = typer.Option(8, help="Most generate requests in one batched forward."),
    adapter_slots: int = typer.Option(32, help="User adapters kept loaded (LRU, >= --max-batch)."),
) -> None:
    """Run the HTTP API (``prisp serve --store DIR``); see the sub-commands for keys and exports."""
    if ctx.invoked_subcommand is not None:
        return
    from prisp.data.tasks import get_task
    from prisp.personalize import PersonalizeConfig
    from prisp.serve.auth import load_admin_hash
    from prisp.serve.config import ServeConfig, ServeLimits, parse_anchor_option
    from prisp.serve.keys import load_key

    if store is None:
        raise PrispError("--store DIR is required to run the server")
    key = load_key(key_file)  # before loading anything: no key, no server
    admin_hash = load_admin_hash(admin_token_file)
    if previous_key_file is not None and Path(store).is_dir():
        from prisp.serve.store import finish_rotation

        finished = finish_rotation(Path(store), load_key(previous_key_file), key)
        if finished is not None:
            typer.echo(f"finished the interrupted key rotation: re-wrapped {finished} data keys", err=True)
    for path in task_file:  # before the anchors, which may name these tasks
        get_task(str(path))
    config = ServeConfig(
        store=store, model=model, host=host, port=port, anchors=dict(parse_anchor_option(a) for a in anchor),
        task_files=tuple(task_file),
        anchors_dir=anchors_dir, random_anchors=random_anchors, hypernet=hypernet, cache_size=cache_size, threads=resolve_threads(threads),
        personalize=PersonalizeConfig(strategy=strategy, schedule=schedule, lr=lr, progress=False),
        limits=ServeLimits(max_body_bytes=max_body_bytes, max_items=max_items, max_jobs_per_hour=max_jobs_per_hour,
                           max_adapters=max_adapters),
        admin_token_hash=admin_hash, open_registration=open_registration, job_timeout_s=job_timeout_s,
        batch_window_ms=batch_window_ms, max_batch=max_batch, adapter_slots=adapter_slots,
    )
    _run_server(config, key)


def _run_server(config, key) -> None:
    import torch
    import uvicorn
    from transformers.utils import logging as hf_logging

    from prisp.serve.app import create_app

    hf_logging.set_verbosity_error()
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.open_registration:
        typer.echo("prisp: warning: --open-registration: anyone who reaches the port can create users and queue "
                   "personalization jobs", err=True)
    if not _is_loopback(config.host):
        typer.echo(f"prisp: warning: listening on {config.host}; bearer tokens travel in clear text unless a "
                   "TLS proxy terminates the connections", err=True)
    typer.echo(f"loading model {config.model} and opening store {config.store} ...", err=True)
    if config.text_anchors:
        typer.echo("no --anchor/--anchors-dir/--random-anchors: each task's anchor comes from its description "
                   f"through the hypernetwork ({config.hypernet or 'the one shipped for ' + config.model}), "
                   "generated once and cached under $PRISP_HOME/anchors", err=True)
    app = create_app(config, key)
    tasks = ", ".join(sorted(app.state.service.anchors))
    typer.echo(f"serving {len(app.state.service.anchors)} tasks: {tasks}", err=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@serve_app.command("admin-token")
@friendly
def admin_token(out: Path = typer.Option(..., help="File for the token's hash (mode 0600); the server reads it "
                                                    "with --admin-token-file.")) -> None:
    """Make an admin token: prints it once and writes only its hash to --out."""
    from prisp.serve.auth import admin_hash_line, issue_token

    if out.exists():
        raise PrispError(f"refusing to overwrite {out}")
    issued = issue_token()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(admin_hash_line(issued.token_hash))
    typer.echo(issued.token)
    typer.echo(f"the admin token above is shown once; {out} holds only its hash", err=True)


@serve_app.command("keygen")
@friendly
def keygen(out: Path | None = typer.Option(None, help="Write the key to this new file (mode 0600) instead.")
           ) -> None:
    """Print a fresh store key (base64 of 32 random bytes) for PRISP_STORE_KEY or --key-file."""
    from prisp.serve.keys import generate_key

    text = generate_key().encode()
    if out is None:
        typer.echo(text)
        return
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PrispError(f"{out} exists; refusing to overwrite a key file") from None
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text + "\n")
    typer.echo(f"new store key -> {out}", err=True)


@serve_app.command("rotate-key")
@friendly
def rotate_key(
    store: Path = typer.Option(..., help="Store directory (stop the server first)."),
    new_key_file: Path = typer.Option(..., help="The new key's file (`prisp serve keygen --out F`)."),
    key_file: Path | None = typer.Option(None, "--old-key-file", "--key-file",
                                         help="The current key's file [default: $PRISP_STORE_KEY]."),
) -> None:
    """Re-wrap every user's data key under a new store key (adapters are not rewritten); killed at any point,
    rerun it with the same keys to finish."""
    from prisp.serve.keys import load_key
    from prisp.serve.store import AdapterStore

    old, new = load_key(key_file), load_key(new_key_file)
    if old.key_id == new.key_id:
        raise PrispError("the new key is the current key; generate one with `prisp serve keygen --out FILE`")
    _require_store(store)
    start = time.perf_counter()
    with AdapterStore(store, old, rotating_to=new.key_id) as opened:
        count = opened.rotate_to(new)
    typer.echo(f"re-wrapped {count} data keys in {time.perf_counter() - start:.2f} s; the store now opens with key "
               f"id {new.key_id} only")


@serve_app.command("export")
@friendly
def export(
    store: Path = typer.Option(..., help="Store directory."),
    user: str = typer.Option(..., help="User id."),
    task: str = typer.Option(..., help="LaMP task."),
    out: Path = typer.Option(..., help="Output peft adapter directory (PLAINTEXT: protect it)."),
    key_file: Path | None = typer.Option(None, help=_KEY_FILE_HELP),
) -> None:
    """Decrypt a user's current adapter to a plain peft directory (e.g. for vLLM multi-LoRA serving)."""
    from prisp.adapters import save_adapter
    from prisp.data.tasks import normalize_task_name
    from prisp.serve.keys import load_key
    from prisp.serve.store import AdapterStore

    task = normalize_task_name(task)
    _require_store(store)
    with AdapterStore(store, load_key(key_file), writer=False) as opened:
        record = opened.current(user, task)
        if record is None:
            raise PrispError(f"user {user!r} has no adapter for {task} in {store}")
        weights = opened.load(record)
    info = {"user_id": record.user_id, "task": record.task, "adapter_version": record.version,
            "base_model": record.base_model, "strategy": record.strategy, "items": record.total_items}
    save_adapter(weights, out, record.base_model, {"prisp_export.json": json.dumps(info, indent=1)})
    typer.echo(f"exported {user} {task} version {record.version} -> {out}")


def _require_store(store: Path) -> None:
    from prisp.serve.store import DB_NAME

    if not (store / DB_NAME).is_file():
        raise PrispError(f"{store} is not a prisp store (no {DB_NAME})")
