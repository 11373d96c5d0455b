"""The `genserve` command: serve, api, worker, migrate, keys, tenants, history here; the
commands that talk to a server over HTTP in service/cli_remote.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from service import logs
from service.cli_remote import ADMIN_KEY_FILE, remote
from service.config import QUEUES, Settings, get_settings

try:  # typer carries its own copy of click since 0.2x; before, it used click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_errors  # type: ignore[no-redef]

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from service.db.tables import Tenant

app = typer.Typer(help="genserve: a self-hosted generation service.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
tenants_app = typer.Typer(help="Tenants: limits, settings, deletion.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
history_app = typer.Typer(help="The stored history: partitioning by month.", no_args_is_help=True)
app.add_typer(history_app, name="history")
# Over HTTP to any server: submit, jobs, generations, search, batch, export, models, train,
# usage, ingest (service/cli_remote.py).
app.add_typer(remote)

ROLES = ("admin", "writer", "reader")


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


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
    """A session on the configured database, for one command."""
    from service.db.session import make_engine, make_sessionmaker

    engine = make_engine(settings.sqlalchemy_url)
    try:
        with make_sessionmaker(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _create_key(
    settings: Settings,
    tenant: str,
    role: str,
    name: str,
    *,
    only_if_none: bool = False,
    expires_at: datetime | None = None,
    rate_limit: int | None = None,
) -> str | None:
    """Create a key and return its plaintext; with only_if_none, only when no key exists."""
    from service.db import tenants

    with _session(settings) as session:
        if only_if_none and tenants.count_api_keys(session):
            return None
        row, plaintext = tenants.create_api_key(
            session,
            tenant_name=tenant,
            role=role,
            name=name,
            expires_at=expires_at,
            rate_limit_per_minute=rate_limit,
        )
        _audit(session, row.tenant_id, "key.create", f"key:{row.id}", {"role": role, "name": name})
        session.commit()
        return plaintext


def _audit(
    session: Session, tenant_id: int, action: str, target: str, detail: dict[str, Any]
) -> None:
    """Log an operator's change from the command line (in the session's transaction)."""
    from service.db import tenants

    tenants.audit(
        session,
        tenant_id=tenant_id,
        actor=tenants.CLI_ACTOR,
        action=action,
        target=target,
        detail=detail,
    )


def _check_tenant_name(tenant: str) -> None:
    if not tenant.strip() or len(tenant) > 64:
        raise typer.BadParameter("tenant must be 1 to 64 characters")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name; created if new.")],
    role: Annotated[str, typer.Option(help="admin, writer or reader.")] = "writer",
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    expires_days: Annotated[
        float | None, typer.Option(min=0.001, help="Expire this many days from now.")
    ] = None,
    rate_limit: Annotated[
        int | None, typer.Option(min=1, help="Requests a minute (at most the tenant's).")
    ] = None,
) -> None:
    """Create an API key; the key is the last word of the last line."""
    if role not in ROLES:
        raise typer.BadParameter(f"{role!r} is not a role; choose one of {list(ROLES)}")
    _check_tenant_name(tenant)
    expires_at = None if expires_days is None else datetime.now(UTC) + timedelta(days=expires_days)
    plaintext = _create_key(
        get_settings(), tenant, role, name, expires_at=expires_at, rate_limit=rate_limit
    )
    assert plaintext is not None
    typer.echo(f"created a {role} key for tenant {tenant!r}; it is shown once:")
    typer.echo(plaintext)


@keys_app.command("list")
def keys_list(tenant: Annotated[str, typer.Option(help="Tenant name.")]) -> None:
    """List a tenant's keys (never the keys themselves)."""
    from service.db import tenants

    with _session(get_settings()) as session:
        row = tenants.get_tenant(session, name=tenant)
        if row is None:
            raise typer.BadParameter(f"no tenant {tenant!r}")
        for key in tenants.list_api_keys(session, tenant_id=row.id):
            state = "revoked" if key.revoked_at else "expires " + str(key.expires_at or "never")
            typer.echo(f"{key.id}\t{key.prefix}…\t{key.role}\t{state}\t{key.name}")


@keys_app.command("revoke")
def keys_revoke(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    key_id: Annotated[int, typer.Argument(help="The key's id (keys list).")],
) -> None:
    """Revoke a key; it is refused from the next request on."""
    from service.db import tenants

    with _session(get_settings()) as session:
        row = tenants.get_tenant(session, name=tenant)
        key = (
            None if row is None else tenants.find_api_key(session, tenant_id=row.id, key_id=key_id)
        )
        if row is None or key is None:
            raise typer.BadParameter(f"no key {key_id} of tenant {tenant!r}")
        tenants.revoke_api_key(session, key=key)
        _audit(session, row.id, "key.revoke", f"key:{key.id}", {"role": key.role, "name": key.name})
        session.commit()
    typer.echo(f"revoked key {key_id} of tenant {tenant!r}")


TENANT_LIMITS = ("rate_limit_per_minute", "requests_per_day", "tokens_per_day")


@tenants_app.command("set")
def tenants_set(
    tenant: Annotated[str, typer.Argument(help="Tenant name; created if new.")],
    redact_pii: Annotated[
        bool | None, typer.Option(help="Redact PII from prompts and outputs.")
    ] = None,
    rate_limit: Annotated[
        int | None, typer.Option(min=0, help="Requests a minute per key; 0 removes it.")
    ] = None,
    requests_per_day: Annotated[
        int | None, typer.Option(min=0, help="Requests a UTC day; 0 removes the quota.")
    ] = None,
    tokens_per_day: Annotated[
        int | None, typer.Option(min=0, help="Tokens a UTC day; 0 removes the quota.")
    ] = None,
) -> None:
    """Set a tenant's limits and settings; what is not given stays as it is."""
    from service.db import tenants

    _check_tenant_name(tenant)
    given: dict[str, Any] = {} if redact_pii is None else {"redact_pii": redact_pii}
    limits = (rate_limit, requests_per_day, tokens_per_day)
    for name, value in zip(TENANT_LIMITS, limits, strict=True):
        if value is not None:
            given[name] = value or None
    with _session(get_settings()) as session:
        row = tenants.ensure_tenant(session, name=tenant)
        changes = tenants.update_tenant(session, tenant=row, values=given)
        if changes:
            _audit(session, row.id, "tenant.update", f"tenant:{tenant}", changes)
        session.commit()
        typer.echo(_describe_tenant(row))


def _describe_tenant(row: Tenant) -> str:
    return f"tenant {row.name!r}: redact_pii={row.redact_pii} " + " ".join(
        f"{name}={getattr(row, name)}" for name in TENANT_LIMITS
    )


@tenants_app.command("show")
def tenants_show(tenant: Annotated[str, typer.Argument(help="Tenant name.")]) -> None:
    """A tenant's limits, settings and usage of the day."""
    from service.db import tenants

    with _session(get_settings()) as session:
        row = tenants.get_tenant(session, name=tenant)
        if row is None:
            raise typer.BadParameter(f"no tenant {tenant!r}")
        used = tenants.usage_of_day(session, tenant_id=row.id)
        typer.echo(_describe_tenant(row))
        typer.echo(
            f"today ({used.day}): {used.requests} requests, "
            f"{used.prompt_tokens} prompt and {used.completion_tokens} completion tokens"
        )


@tenants_app.command("delete")
def tenants_delete(
    tenant: Annotated[str, typer.Argument(help="Tenant name.")],
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: this cannot be undone.")] = False,
) -> None:
    """Delete a tenant with its keys, jobs, generations, files, models and vectors."""
    from service.db import tenants

    if not yes:
        raise typer.BadParameter("deleting a tenant cannot be undone; pass --yes")
    with _session(get_settings()) as session:
        row = tenants.get_tenant(session, name=tenant)
        if row is None:
            raise typer.BadParameter(f"no tenant {tenant!r}")
        vectors = tenants.delete_tenant(session, tenant=row)
        _audit(session, row.id, "tenant.delete", f"tenant:{tenant}", {"vectors": vectors})
        session.commit()
    typer.echo(f"deleted tenant {tenant!r} and {vectors} vectors")


@history_app.command("partition")
def history_partition(
    months_ahead: Annotated[
        int, typer.Option(min=1, max=60, help="Months of partitions made ahead of now.")
    ] = 3,
    split_history: Annotated[
        bool,
        typer.Option(
            "--split-history",
            help="Copy the stored rows into a partition per month (slower, under the lock).",
        ),
    ] = False,
) -> None:
    """Partition the generations table by month (PostgreSQL; once, one way).

    By default copies no rows: the table becomes the partition of everything up to the end
    of this month. The lock is held for one transaction. job_id stays indexed but no
    longer unique (one generation per job is kept by the job's own transition).
    """
    from service.db import partitions

    settings = get_settings()
    with _session(settings) as session:
        try:
            made = partitions.partition_generations(
                session.connection(),
                now=datetime.now(UTC),
                months_ahead=months_ahead,
                split_history=split_history,
            )
        except ValueError as exc:  # not PostgreSQL
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        session.commit()
    if not made:
        typer.echo("generations is already partitioned")
        return
    typer.echo(f"generations partitioned by month: {', '.join(made)}")


@history_app.command("partitions")
def history_partitions() -> None:
    """List the partitions of the generations table, with PostgreSQL's row estimates."""
    from service.db import partitions

    with _session(get_settings()) as session:
        found = partitions.partitions(session.connection())
    if not found:
        typer.echo("generations is not partitioned")
        return
    for partition in found:
        lower = partition.lower or ("DEFAULT" if partition.upper is None else "MINVALUE")
        upper = partition.upper or ""
        typer.echo(f"{partition.name:<32} {lower:>18} {upper:>18} {partition.rows:>12}")


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
        # The logging main() set up stays; the API logs its own access lines, with ids.
        log_config=None,
        access_log=False,
    )


@app.command()
def worker(
    queues: Annotated[str | None, typer.Option(help=f"Comma-separated, of {QUEUES}.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Jobs at once.")] = None,
    pool: Annotated[str | None, typer.Option(help="solo, prefork or threads.")] = None,
) -> None:
    """Run a Celery worker (the model runner)."""
    settings = get_settings()
    queues = queues or ",".join(q for q in QUEUES if q in settings.worker_queues)
    # The worker's own settings see the queues it consumes (its heartbeat reports them).
    os.environ["GENSERVE_WORKER_QUEUES"] = queues
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app:app",
        "worker",
        "--queues",
        queues,
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
    typer.echo(f"genserve is starting at http://{host}:{port} (console at /console, docs at /docs)")
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
    try:
        settings = get_settings()
        logs.configure(settings.resolved_log_format, settings.log_level)
    except ValidationError:  # the command that reads the settings says what is wrong
        logs.configure("text")
    sys.exit(run(sys.argv[1:]))


def run(args: list[str]) -> int:
    """The command line, its exit status returned; a mistake is one line on stderr.

    Wrong usage (a missing argument, a bad value) exits 2, a setting or database the
    command cannot use exits 1, Ctrl-C 130. Anything else is a bug and keeps its traceback.
    """
    from sqlalchemy.exc import SQLAlchemyError

    try:
        status = app(args, prog_name="genserve", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        typer.echo(exc.format_message())
        return 2
    except click_errors.UsageError as exc:
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        return _error(exc.format_message() + hint, 2)
    except (typer.Abort, KeyboardInterrupt):
        return _error("stopped", 130)
    except ValidationError as exc:  # the settings (GENSERVE_*)
        return _error("; ".join(_setting_problem(e) for e in exc.errors()), 1)
    except SQLAlchemyError as exc:
        problem = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        if "no such table" in problem or "does not exist" in problem:
            problem += "; is the database migrated? run: genserve migrate"
        return _error(f"database: {problem}", 1)
    return status if isinstance(status, int) else 0


def _setting_problem(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"GENSERVE_{where.upper()}: {message}" if where else message


def _error(message: str, status: int) -> int:
    typer.echo(f"error: {message}", err=True)
    return status


if __name__ == "__main__":
    main()
