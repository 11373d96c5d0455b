"""The `genserve` command: serve, api, worker, migrate, keys."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Annotated

import typer

from service.config import QUEUES, Settings, get_settings

app = typer.Typer(help="genserve: a self-hosted generation service.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

ROLES = ("admin", "writer", "reader")
ADMIN_KEY_FILE = "admin-key.txt"


def _migrate(settings: Settings) -> None:
    from service.db.migrate import upgrade

    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.sqlalchemy_url)
    if settings.builtin_models:
        _register_builtins(settings)


def _register_builtins(settings: Settings) -> None:
    """The checkpoints that ship in the package become model versions everyone can use."""
    from service.checkpoints import register_builtins
    from service.db.session import make_engine, make_sessionmaker

    engine = make_engine(settings.sqlalchemy_url)
    try:
        with make_sessionmaker(engine)() as session:
            register_builtins(session)
            session.commit()
    finally:
        engine.dispose()


@app.command()
def migrate() -> None:
    """Apply the database migrations up to the newest."""
    settings = get_settings()
    _migrate(settings)
    typer.echo(f"database is up to date: {settings.sqlalchemy_url.split('@')[-1]}")


def _create_key(
    settings: Settings, tenant: str, role: str, name: str, *, only_if_none: bool = False
) -> str | None:
    """Create a key and return its plaintext; with only_if_none, only when no key exists."""
    from service.db import crud
    from service.db.session import make_engine, make_sessionmaker

    engine = make_engine(settings.sqlalchemy_url)
    try:
        with make_sessionmaker(engine)() as session:
            if only_if_none and crud.count_api_keys(session):
                return None
            _, plaintext = crud.create_api_key(session, tenant_name=tenant, role=role, name=name)
            session.commit()
            return plaintext
    finally:
        engine.dispose()


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name; created if new.")],
    role: Annotated[str, typer.Option(help="admin, writer or reader.")] = "writer",
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
) -> None:
    """Create an API key; the key is the last word of the last line."""
    if role not in ROLES:
        raise typer.BadParameter(f"{role!r} is not a role; choose one of {list(ROLES)}")
    if not tenant.strip() or len(tenant) > 64:
        raise typer.BadParameter("tenant must be 1 to 64 characters")
    plaintext = _create_key(get_settings(), tenant, role, name)
    assert plaintext is not None
    typer.echo(f"created a {role} key for tenant {tenant!r}; it is shown once:")
    typer.echo(plaintext)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
) -> None:
    """Run the HTTP API."""
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        log_level="info",
    )


@app.command()
def worker(
    queues: Annotated[str | None, typer.Option(help=f"Comma-separated, of {QUEUES}.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Jobs at once.")] = None,
    pool: Annotated[str | None, typer.Option(help="solo, prefork or threads.")] = None,
) -> None:
    """Run a Celery worker (the model runner)."""
    settings = get_settings()
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app:app",
        "worker",
        "--queues",
        queues or ",".join(q for q in QUEUES if q in settings.worker_queues),
        "--concurrency",
        str(concurrency or settings.worker_slots),
        "--pool",
        pool or settings.worker_pool,
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--hostname",
        f"genserve@{os.uname().nodename}-{os.getpid()}",
    ]
    os.execv(sys.executable, command)


def _bootstrap_admin_key(settings: Settings) -> str | None:
    """On the very first start, make an admin key and keep a copy readable only by you."""
    plaintext = _create_key(settings, "default", "admin", "first start", only_if_none=True)
    if plaintext is not None:
        path = settings.resolved_data_dir / ADMIN_KEY_FILE
        path.touch(mode=0o600)
        path.write_text(plaintext + "\n")
    return plaintext


def _stop(children: list[subprocess.Popen[bytes]]) -> int:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for child in children:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
    return max((abs(c.returncode or 0) for c in children), default=0)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
) -> None:
    """Migrate, then run the API and one worker together until Ctrl-C."""
    settings = get_settings()
    _migrate(settings)
    admin_key = _bootstrap_admin_key(settings)
    host, port = host or settings.host, port or settings.port
    cli = [sys.executable, "-m", "service.cli"]
    children = [
        subprocess.Popen([*cli, "api", "--host", host, "--port", str(port)]),
        subprocess.Popen([*cli, "worker"]),
    ]
    typer.echo(f"genserve is starting at http://{host}:{port} (docs at /docs)")
    if admin_key:
        typer.echo(f"admin API key (saved in {settings.resolved_data_dir / ADMIN_KEY_FILE}):")
        typer.echo(admin_key)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    code = _stop(children)
    typer.echo("genserve stopped")
    raise typer.Exit(0 if stopping else code or 1)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app()


if __name__ == "__main__":
    main()
