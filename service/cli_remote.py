"""The commands that talk to a genserve server over HTTP, all through service.client.

Where the server is and who calls: --url and --key, else GENSERVE_URL and
GENSERVE_API_KEY, else the config file (GENSERVE_CONFIG, default
~/.config/genserve/config.toml):

    url = "https://genserve.example.com"
    api_key = "gs-…"

and, for a server on this machine, the admin key `genserve serve` wrote on its first start.
An error prints one line on stderr and exits 1; `--json` prints what the API answered.
Progress and tables go to stderr and stdout respectively, so `--json` output pipes cleanly.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import IO, Annotated, Any, NoReturn, cast

import httpx
import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from service.api.schemas import IngestionPublic
from service.client import DEFAULT_URL, ApiError, Client
from service.config import get_settings
from service.db.tables import TERMINAL_STATUSES

remote = typer.Typer()
batch_app = typer.Typer(help="Run a JSONL file of requests as jobs.", no_args_is_help=True)
remote.add_typer(batch_app, name="batch")

ADMIN_KEY_FILE = "admin-key.txt"
CONFIG_PATH = Path("~/.config/genserve/config.toml")

UrlOption = Annotated[
    str | None, typer.Option(envvar="GENSERVE_URL", help="The API (default: config, then local).")
]
KeyOption = Annotated[str | None, typer.Option(envvar="GENSERVE_API_KEY", help="An API key.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's answer as JSON.")]
# The history's filters and pages, as the listings and search take them.
ModelOption = Annotated[str | None, typer.Option(help="Only this model's.")]
TagOption = Annotated[list[str] | None, typer.Option(help="Has this tag (repeatable).")]
LimitOption = Annotated[int, typer.Option(min=1, max=100)]
CursorOption = Annotated[str | None, typer.Option(help="The next page, from the last one.")]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _config() -> dict[str, Any]:
    path = Path(os.environ.get("GENSERVE_CONFIG") or CONFIG_PATH).expanduser()
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        _fail(f"cannot read the config file {path}: {exc}")


def resolve(url: str | None, key: str | None) -> tuple[str, str]:
    """The server and the key, by the order in the module's docstring."""
    config = _config()
    url = url or config.get("url") or DEFAULT_URL
    key = key or config.get("api_key")
    if not key:
        key_file = get_settings().resolved_data_dir / ADMIN_KEY_FILE
        key = key_file.read_text().strip() if key_file.is_file() else None
    if not key:
        raise typer.BadParameter(
            "give --key, set GENSERVE_API_KEY, or put api_key in the config file",
            param_hint="--key",
        )
    return url, key


def _fail(message: str) -> NoReturn:
    err.print(Text(f"error: {message}", style="red"))
    raise typer.Exit(1)


@contextmanager
def connected(url: str | None, key: str | None) -> Iterator[Client]:
    """A client of the server; what goes wrong on the way becomes one line and exit 1."""
    base, api_key = resolve(url, key)
    try:
        with Client(base, api_key, timeout=60) as client:
            yield client
    except ApiError as exc:
        _fail(str(exc))
    except httpx.TransportError as exc:
        _fail(f"cannot reach {base}: {exc}")
    except TimeoutError as exc:
        _fail(str(exc))


def _print_json(answer: BaseModel | dict[str, Any] | list[Any]) -> None:
    if isinstance(answer, BaseModel):
        typer.echo(answer.model_dump_json())
    else:
        typer.echo(json.dumps(answer, default=str, ensure_ascii=False))


def _table(headers: list[str], rows: list[list[str]]) -> None:
    """Rows as a table on a terminal; piped, as tab-separated lines without the header
    (nothing cut to the width, for grep, cut and awk)."""
    if not out.is_terminal:
        for row in rows:
            typer.echo("\t".join(row))
        return
    table = Table(*headers, box=None)
    for column in table.columns[:-1]:  # one line a row; only the last column (text) wraps
        column.no_wrap = True
    table.columns[0].min_width = max((len(row[0]) for row in rows), default=0)  # ids whole
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _short(text: str | None, width: int = 60) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _when(stamp: Any) -> str:
    return "" if stamp is None else stamp.strftime("%Y-%m-%d %H:%M:%S")


# --- jobs -----------------------------------------------------------------------------------


@remote.command()
def submit(
    model: Annotated[str, typer.Argument(help="A served model.")],
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    max_tokens: Annotated[int, typer.Option(min=1, help="New tokens at most.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy.")] = 0.0,
    stream: Annotated[bool, typer.Option("--stream", help="Print the text as it comes.")] = False,
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Submit a prompt and print the generation when it is done (as it comes, with --stream)."""
    params = {"max_tokens": max_tokens, "temperature": temperature}
    with connected(url, key) as client:
        job = client.submit(model, prompt=prompt, params=params)
        if stream and not as_json:
            for text in client.stream(job.id):
                typer.echo(text, nl=False)
            typer.echo()
        job = client.wait(job.id)
        if as_json:
            _print_json(job)
        elif job.status != "succeeded":
            _fail(f"job {job.id} {job.status}: {job.error}")
        elif not stream and job.generation_id:
            typer.echo(client.generation(job.generation_id).output)


@remote.command()
def jobs(
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded...")] = None,
    model: ModelOption = None,
    tag: TagOption = None,
    limit: LimitOption = 20,
    cursor: CursorOption = None,
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Your jobs, newest first."""
    with connected(url, key) as client:
        page = client.jobs(status=status, model=model, tag=tag, limit=limit, cursor=cursor)
    if as_json:
        _print_json(page)
        return
    _table(
        ["id", "status", "model", "queue", "created", "error"],
        [
            [job.id, job.status, job.model, job.queue, _when(job.created_at), _short(job.error, 40)]
            for job in page.data
        ],
    )
    if page.next_cursor:
        err.print(f"more: --cursor {page.next_cursor}")


@remote.command()
def generations(
    generation_id: Annotated[
        str | None, typer.Argument(help="Show this one whole; else list.")
    ] = None,
    model: ModelOption = None,
    tag: TagOption = None,
    conversation: Annotated[str | None, typer.Option(help="One conversation's.")] = None,
    limit: LimitOption = 20,
    cursor: CursorOption = None,
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """The stored history, newest first; or one generation with its prompt and output."""
    with connected(url, key) as client:
        if generation_id:
            one = client.generation(generation_id)
            if as_json:
                _print_json(one)
                return
            out.print(Text(f"{one.id}  {one.model}  {_when(one.created_at)}", style="bold"))
            out.print(Text("prompt: ", style="dim") + Text(one.prompt))
            out.print(Text("output: ", style="dim") + Text(one.output))
            usage = one.usage
            out.print(
                Text(
                    f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens, "
                    f"{one.finish_reason}; feedback {one.feedback_score} ({one.feedback_count})",
                    style="dim",
                )
            )
            return
        page = client.generations(
            model=model, tag=tag, conversation_id=conversation, limit=limit, cursor=cursor
        )
    if as_json:
        _print_json(page)
        return
    _table(
        ["id", "model", "created", "tokens", "output"],
        [
            [
                row.id,
                row.model,
                _when(row.created_at),
                str(row.usage.completion_tokens),
                _short(row.output),
            ]
            for row in page.data
        ],
    )
    if page.next_cursor:
        err.print(f"more: --cursor {page.next_cursor}")


def _highlighted(text: str, spans: list[tuple[int, int]]) -> Text:
    """The snippet with its matched ranges in bold (as Text: nothing in it is markup)."""
    shown = Text(text)
    for start, end in spans:
        shown.stylize("bold yellow", start, end)
    return shown


@remote.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    mode: Annotated[str, typer.Option(help="vector, keyword or hybrid.")] = "hybrid",
    k: Annotated[int, typer.Option(min=1, max=100, help="Results.")] = 10,
    target: Annotated[str, typer.Option(help="prompt, output or both.")] = "both",
    tag: TagOption = None,
    model: ModelOption = None,
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Search past generations by meaning, by words, or both."""
    filters: dict[str, Any] = {"tags": tag} if tag else {}
    if model:
        filters["model"] = model
    with connected(url, key) as client:
        try:
            found = client.search(query, mode=mode, k=k, target=target, filters=filters)
        except ValidationError as exc:
            _fail(exc.errors()[0]["msg"])
    if as_json:
        _print_json(found)
        return
    if not found.data:
        err.print("no results")
    for rank, hit in enumerate(found.data, start=1):
        head = Text(f"{rank:>2}. {hit.score:.3f}  {hit.generation.id}  {hit.generation.model}")
        out.print(head, style="bold")
        for field_name in ("prompt", "output"):
            snippet = hit.snippets.get(field_name)
            if snippet is not None:
                line = Text(f"    {field_name}: ", style="dim")
                out.print(line + _highlighted(snippet.text, snippet.highlights))


# --- batches --------------------------------------------------------------------------------


@batch_app.command("run")
def batch_run(
    file: Annotated[
        Path, typer.Argument(help="JSONL: one request a line.", exists=True, dir_okay=False)
    ],
    model: Annotated[str | None, typer.Option(help="For lines that name none.")] = None,
    output: Annotated[
        Path | None, typer.Option(help="Results, JSONL (default: FILE.results.jsonl).")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=1000, help="Jobs in flight.")] = 32,
    queue: Annotated[str, typer.Option(help="batch (after interactive) or interactive.")] = "batch",
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Default max_tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="Default temperature.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="No progress bar; a summary.")] = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Run every line of FILE as a job and write each result as it comes.

    Stopped (Ctrl-C), the same command resumes: lines with a result are not submitted
    again, and jobs submitted before are followed rather than run twice.
    """
    from service.batch_run import BatchFileError, BatchRunner, Tally, read_lines, run_id

    if queue not in ("batch", "interactive"):
        raise typer.BadParameter("batch or interactive", param_hint="--queue")
    defaults = {
        name: value
        for name, value in (("max_tokens", max_tokens), ("temperature", temperature))
        if value is not None
    }
    try:
        lines = read_lines(file, model=model, params=defaults)
    except BatchFileError as exc:
        _fail(str(exc))
    output = output or file.with_name(file.stem + ".results.jsonl")
    with connected(url, key) as client:
        runner = BatchRunner(
            client,
            lines,
            output,
            concurrency=concurrency,
            queue=queue,
            run=run_id(file, lines),
        )
        progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TextColumn("{task.fields[rate]:.1f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err,
            disable=as_json,
        )
        task = progress.add_task(file.name, total=len(lines), failed=0, rate=0.0)

        def show(tally: Tally) -> None:
            progress.update(
                task, completed=tally.done, failed=tally.failed, rate=tally.tokens_per_s
            )

        try:
            with progress:
                tally = runner.run(show)
        except KeyboardInterrupt:
            done = runner.tally
            err.print(
                f"stopped: {done.done} of {done.total} lines have results in {output}; "
                "run the same command to resume"
            )
            raise typer.Exit(130) from None
    summary = {
        "total": tally.total,
        "done": tally.done,
        "failed": tally.failed,
        "completion_tokens": tally.tokens,
        "elapsed_s": round(tally.elapsed_s, 2),
        "output": str(output),
    }
    if as_json:
        _print_json(summary)
    else:
        err.print(f"{tally.done - tally.failed} succeeded, {tally.failed} failed: {output}")
    if tally.failed:
        raise typer.Exit(1)


# --- the history out, models, training, usage -----------------------------------------------


@remote.command()
def export(
    output: Annotated[Path, typer.Option(help="Where to write the JSONL.")],
    fmt: Annotated[
        str, typer.Option("--format", help="openai_chat or prompt_completion.")
    ] = "openai_chat",
    model: ModelOption = None,
    tag: TagOption = None,
    dedup: Annotated[bool, typer.Option(help="Drop exact and near duplicates.")] = True,
    limit: Annotated[int | None, typer.Option(min=1, help="Rows at most.")] = None,
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Export the history as training data (JSONL) and download it when it is written."""
    filters: dict[str, Any] = {"tags": tag or []}
    if model:
        filters["model"] = model
    request: dict[str, Any] = {
        "format": fmt,
        "filters": filters,
        "dedup": {"exact": dedup, "near": dedup},
    }
    if limit:
        request["limit"] = limit
    with connected(url, key) as client:
        try:
            started = client.export(**request)
        except ValidationError as exc:
            _fail(exc.errors()[0]["msg"])
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=err,
            disable=as_json,
        ) as progress:
            task = progress.add_task(f"export {started.id}: {started.status}")
            done = started
            while done.status not in TERMINAL_STATUSES:
                time.sleep(0.5)
                done = client.export_status(started.id)
                progress.update(task, description=f"export {started.id}: {done.status}")
        if done.status != "succeeded" or not done.output_file_id:
            _fail(f"export {done.id} {done.status}: {done.error}")
        output.write_bytes(client.file_content(done.output_file_id))
    if as_json:
        _print_json(done)
        return
    counts = (done.manifest or {}).get("counts", {})
    err.print(f"wrote {output} ({counts.get('written', '?')} rows)")


@remote.command()
def models(as_json: JsonOption = False, url: UrlOption = None, key: KeyOption = None) -> None:
    """The models the server serves, and the versions trained on it."""
    with connected(url, key) as client:
        found = client.models()
    if as_json:
        _print_json(found)
        return
    rows = []
    for card in found.data:
        version = getattr(card, "version", None)
        default = getattr(card, "default", None)
        rows.append(
            [
                card.id,
                getattr(card, "family", ""),
                "" if version is None else str(version),
                "yes" if default else "",
                getattr(card, "training_job_id", None) or "",
            ]
        )
    _table(["id", "family", "version", "default", "training job"], rows)


@remote.command()
def train(
    name: Annotated[str, typer.Argument(help="The model name the version registers under.")],
    arch: Annotated[str, typer.Option(help="char_rnn, vae, gan, diffusion, tabular...")],
    dataset: Annotated[
        Path, typer.Option(help="The training data file.", exists=True, dir_okay=False)
    ],
    config: Annotated[str, typer.Option(help="The family's config overrides, as JSON.")] = "{}",
    seed: Annotated[int, typer.Option(min=0)] = 0,
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Upload a dataset, train a model on it and follow its loss live."""
    try:
        overrides = json.loads(config)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--config") from None
    with connected(url, key) as client:
        uploaded = client.upload(dataset, purpose="fine-tune")
        try:
            job = client.train(name, arch, uploaded.id, config=overrides, seed=seed)
        except ValidationError as exc:
            _fail(exc.errors()[0]["msg"])
        err.print(f"training job {job.id} on {uploaded.filename} ({uploaded.bytes} bytes)")
        seen = 0
        while True:
            for event in client.training_progress(job.id, after=seen).data:
                seen = event.id
                if event.kind == "progress" and not as_json:
                    err.print(_loss_line(event.data))
            job = client.training_job(job.id)
            if job.status in TERMINAL_STATUSES:
                break
            time.sleep(0.5)
    if as_json:
        _print_json(job)
    if job.status != "succeeded":
        _fail(f"training job {job.id} {job.status}: {job.error}")
    if not as_json:
        err.print(f"registered {job.model}")


def _loss_line(report: dict[str, Any]) -> Text:
    losses = "  ".join(f"{name} {value:.4f}" for name, value in report.get("losses", {}).items())
    val = report.get("val_loss")
    tail = "" if val is None else f"  val_loss {val:.4f}"
    return Text(f"epoch {report.get('epoch')} step {report.get('step')}  {losses}{tail}")


@remote.command()
def usage(
    start: Annotated[str | None, typer.Option(help="First UTC day (YYYY-MM-DD).")] = None,
    end: Annotated[str | None, typer.Option(help="Last UTC day, included.")] = None,
    group_by: Annotated[str, typer.Option(help="day, api_key_id, model; comma-separated.")] = "day",
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Requests, tokens, latency and cache hits, per day (or key, or model)."""
    for value, hint in ((start, "--start"), (end, "--end")):
        if value is not None:
            try:
                date.fromisoformat(value)
            except ValueError:
                raise typer.BadParameter("a day, YYYY-MM-DD", param_hint=hint) from None
    with connected(url, key) as client:
        report = client.usage(start=start, end=end, group_by=group_by, model=model)
    if as_json:
        _print_json(report)
        return
    groups = report.group_by
    rows = []
    for row in [*report.data, report.total]:
        names = (
            [str(getattr(row, g) or "") for g in groups]
            if row is not report.total
            else ["total", *[""] * (len(groups) - 1)]
        )
        latency = row.latency_ms
        rows.append(
            [
                *names,
                str(row.requests),
                str(row.errors),
                str(row.prompt_tokens),
                str(row.completion_tokens),
                _ms(latency.p50),
                _ms(latency.p95),
                str(row.cache_hits),
            ]
        )
    columns = ["requests", "errors", "prompt tok", "completion tok", "p50 ms", "p95 ms"]
    _table([*groups, *columns, "cache hits"], rows)


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


# --- documents ------------------------------------------------------------------------------

UPLOAD_FILES = 50  # files per upload request
UPLOAD_BYTES = 32 * 1024 * 1024  # bytes per upload request, about


def _upload_groups(paths: list[Path]) -> Iterator[list[Path]]:
    group: list[Path] = []
    size = 0
    for path in paths:
        length = path.stat().st_size
        if group and (len(group) >= UPLOAD_FILES or size + length > UPLOAD_BYTES):
            yield group
            group, size = [], 0
        group.append(path)
        size += length
    if group:
        yield group


def _documents_in(folder: Path) -> list[Path]:
    from service.rag.extract import EXTENSIONS

    if folder.is_file():
        return [folder]
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.suffix.lower() in EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


@remote.command()
def ingest(
    folder: Annotated[Path, typer.Argument(help="A folder of documents, or one file.")],
    collection: Annotated[str, typer.Option(help="Collection id or name; made if missing.")],
    wait: Annotated[bool, typer.Option(help="Wait until the documents are searchable.")] = True,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Upload a folder of documents (text, Markdown, HTML, PDF, JSONL) into a collection
    and follow their ingestion: a bar per file while it uploads, one for the bytes of all
    files, and one for the documents ingested."""
    if not folder.exists():
        raise typer.BadParameter(f"{folder} does not exist", param_hint="FOLDER")
    paths = _documents_in(folder)
    if not paths:
        _fail(f"no documents in {folder}")
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    )
    with connected(url, key) as client, progress:
        try:
            found = client.collection(collection)
        except ApiError as exc:
            if exc.status != 404:
                raise
            found = client.create_collection(collection)
        total = sum(path.stat().st_size for path in paths)
        uploaded = progress.add_task(f"upload {len(paths)} files", total=total)
        ingestions = [
            _upload(client, found.id, group, progress, uploaded) for group in _upload_groups(paths)
        ]
        overall = progress.add_task("documents ingested", total=len(paths))
        failed = _follow_ingestions(client, ingestions, progress, overall) if wait else False
    out.print(f"uploaded {len(paths)} files to collection {found.id}")
    raise typer.Exit(1 if failed else 0)


class _Counted:
    """A file read in chunks as the upload sends it: its own bar (shown while it is being
    sent) and the overall one advance with each chunk."""

    def __init__(self, path: Path, progress: Progress, overall: Any) -> None:
        self._handle = path.open("rb")
        self._progress = progress
        self._overall = overall
        self._size = path.stat().st_size
        self._task = progress.add_task(f"  {path.name}", total=self._size or 1, visible=False)

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        sent = self._handle.tell()
        self._progress.update(self._task, completed=sent, visible=0 < sent < self._size)
        self._progress.advance(self._overall, len(chunk))
        return chunk

    # httpx learns the length from these, so the body is not sent chunked.
    def fileno(self) -> int:
        return self._handle.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def close(self) -> None:
        self._handle.close()
        self._progress.remove_task(self._task)


def _upload(
    client: Client, collection_id: int, group: list[Path], progress: Progress, task: Any
) -> IngestionPublic:
    handles = [_Counted(path, progress, task) for path in group]
    try:
        return client.add_documents(
            collection_id,
            [(p.name, cast(IO[bytes], h)) for p, h in zip(group, handles, strict=True)],
        )
    finally:
        for handle in handles:
            handle.close()


def _follow_ingestions(
    client: Client, ingestions: list[IngestionPublic], progress: Progress, overall: Any
) -> bool:
    """Until every ingestion ends; True when one failed (its errors printed)."""
    while True:
        states = [client.ingestion(i.collection_id, i.id) for i in ingestions]
        counts = [state.progress.get("documents", {}) for state in states]
        progress.update(
            overall,
            completed=sum(c.get("done", 0) for c in counts),
            total=max(sum(c.get("total", 0) for c in counts), 1),
        )
        if all(state.status in TERMINAL_STATUSES for state in states):
            for state in states:
                for error in state.progress.get("errors", []):
                    err.print(Text(f"error: {error}", style="red"))
            return any(state.status != "succeeded" for state in states)
        time.sleep(0.5)
