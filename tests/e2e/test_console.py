"""The web console in headless Chromium against the live API and worker: a wrong key is
refused and a right one signs in, the playground shows tokens as they stream, search finds
a generation and opens it, feedback given there is stored, and every view draws at desktop
and phone widths. The key shows in no URL the browser visits and in no log line.

Debian's chromium is driven by Playwright's client (never its own browser downloads).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageStat
from playwright.sync_api import Browser, Page, Request, ViewportSize, expect, sync_playwright

from tests.conftest import ROOT, unavailable
from tests.e2e.conftest import Live
from tests.e2e.test_training import RNN_CONFIG as TRAINING_RNN_CONFIG
from tests.utils.server import wait_for_job

pytestmark = pytest.mark.e2e

MODEL = "tiny-random-llama"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's: .ci/run installs it
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
# GENSERVE_CONSOLE_SCREENSHOTS=docs also writes docs/console-{desktop,phone}.png, from a
# conversation with the real chat model so the pictures show real text.
FOR_DOCS = os.environ.get("GENSERVE_CONSOLE_SCREENSHOTS") == "docs"
SHOWCASE_MODEL = "smollm2-135m-instruct" if FOR_DOCS else MODEL
# Greedy decoding of this prompt runs the tiny model to its 256-token budget: a stream
# long enough to arrive in many events.
STREAMED_PROMPT = "Write a poem about the moon"
TAG = "tides"
TIDES = [
    {
        "id": "tides",
        "title": "Tides",
        "text": "The Moon's pull raises two bulges of sea, "
        "so most coasts get two high tides a day.",
    },
    {
        "id": "springs",
        "title": "Spring and neap tides",
        "text": "Sun and Moon in line make spring tides; at right angles, neap tides.",
    },
]
# The tiny model's 512-token context (bytes) holds both passages only beside a short answer.
SHOWCASE_TOKENS = 160 if FOR_DOCS else 24
# The training tests' tiny budget, an epoch longer: a curve of a few points to draw.
RNN_CONFIG = {**TRAINING_RNN_CONFIG, "epochs": 3}


@dataclass(frozen=True)
class Showcase:
    """What one tenant of this module's own holds: a grounded two-turn conversation, a
    training run and a batch."""

    key: str
    first: dict[str, Any]  # the grounded first turn
    second: dict[str, Any]  # its follow-up
    training_job_id: str


@dataclass
class Console:
    """A browser tab on the console, recording every URL it requests or navigates to."""

    page: Page
    base_url: str
    urls: list[str] = field(default_factory=list)
    # API requests sent without the key in their Authorization header
    unauthorized: list[str] = field(default_factory=list)

    def open(self, route: str) -> None:
        self.page.goto(f"{self.base_url}/console#/{route}")
        expect(self.page.locator("#view")).not_to_have_attribute("aria-busy", "true")

    def sign_in(self, key: str) -> None:
        self.page.goto(f"{self.base_url}/console")
        self.page.fill("#login-key", key)
        self.page.click("#login-form button[type=submit]")
        expect(self.page.locator("#nav")).to_be_visible()

    def shoot(self, path: Path) -> Path:
        """A screenshot of the viewport, checked to show something."""
        self.page.screenshot(path=path)
        image = Image.open(path).convert("RGB")
        colours = image.getcolors(maxcolors=1 << 16)  # None: more than that many
        assert colours is None or len(colours) > 32, f"{path.name} is nearly blank"
        assert max(ImageStat.Stat(image).stddev) > 12, f"{path.name} is nearly uniform"
        return path

    def fits_the_width(self) -> bool:
        width = self.page.evaluate("document.documentElement.scrollWidth")
        return bool(width <= self.page.viewport_size["width"])

    def assert_kept_secret(self, live: Live, *keys: str) -> None:
        """No key in a URL visited, and none in the API's or the worker's log; every API
        request carried it in its Authorization header."""
        assert self.urls and not self.unauthorized
        logs = "".join(
            path.read_text(errors="replace") for path in live.service.log_dir.glob("*.log")
        )
        for key in keys:
            assert not [url for url in self.urls if key in url]
            assert key not in logs


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        unavailable(
            f"Chromium at {CHROMIUM} (apt-get install chromium)",
            FileNotFoundError(str(CHROMIUM)),
        )
    with sync_playwright() as playwright:
        # No sandbox: the suite runs as root in CI, where Chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def sqlite_live(live: Live) -> Live:
    if live.backend != "sqlite":
        pytest.skip("the console does not depend on the backend")
    return live


@contextmanager
def _tab(browser: Browser, live: Live, viewport: ViewportSize) -> Iterator[Console]:
    context = browser.new_context(viewport=viewport)
    context.set_default_timeout(60_000)
    page = context.new_page()
    console = Console(page=page, base_url=live.service.base_url)

    def seen(request: Request) -> None:
        console.urls.append(request.url)
        api = request.url.startswith(f"{live.service.base_url}/v1/")
        if api and not request.headers.get("authorization", "").startswith("Bearer gs"):
            console.unauthorized.append(request.url)

    page.on("request", seen)
    page.on("framenavigated", lambda frame: console.urls.append(frame.url))
    try:
        yield console
    finally:
        context.close()


@pytest.fixture
def console(browser: Browser, sqlite_live: Live) -> Iterator[Console]:
    with _tab(browser, sqlite_live, DESKTOP) as tab:
        yield tab


def _generate(client: httpx.Client, **body: Any) -> dict[str, Any]:
    answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 202, answer.text
    job = wait_for_job(client, answer.json()["id"])
    assert job["status"] == "succeeded", job
    return client.get(f"/v1/generations/{job['generation_id']}").json()


def _grounding(client: httpx.Client) -> str:
    """A collection holding the tides documents, ingested; returns its name."""
    name = f"tides-{uuid.uuid4().hex[:6]}"
    assert client.post("/v1/collections", json={"name": name}).status_code == 201
    answer = client.post(f"/v1/collections/{name}/documents", json={"documents": TIDES})
    assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + 180
    while (ingestion := client.get(answer.headers["Location"]).json())["status"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline, ingestion
        time.sleep(0.2)
    assert ingestion["status"] == "succeeded", ingestion
    return name


def _train(client: httpx.Client) -> str:
    """A tiny char_rnn trained to the end; returns its training job's id."""
    text = ("the tide comes in and the tide goes out. " * 60).encode()
    dataset = client.post(
        "/v1/files", files={"file": ("tides.txt", text)}, data={"purpose": "fine-tune"}
    ).json()
    body = {
        "name": "tides-rnn",
        "arch": "char_rnn",
        "dataset_file_id": dataset["id"],
        "config": RNN_CONFIG,
    }
    job = client.post("/v1/training-jobs", json=body).json()
    deadline = time.monotonic() + 180
    while (job := client.get(f"/v1/training-jobs/{job['id']}").json())["status"] not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert job["status"] == "succeeded", job
    return str(job["id"])


def _batch(client: httpx.Client) -> None:
    line = {
        "custom_id": "one",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    }
    upload = client.post(
        "/v1/files",
        files={"file": ("one.jsonl", (json.dumps(line) + "\n").encode())},
        data={"purpose": "batch"},
    ).json()
    body = {
        "input_file_id": upload["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    assert client.post("/v1/batches", json=body).status_code == 200


@pytest.fixture(scope="module")
def showcase(live: Live) -> Showcase:
    if live.backend != "sqlite":
        pytest.skip("the console does not depend on the backend")
    key = live.service.create_key(f"console{uuid.uuid4().hex[:8]}", "writer")
    params = {"max_tokens": SHOWCASE_TOKENS, "temperature": 0.0}
    with live.service.client(key) as client:
        collection = _grounding(client)
        first = _generate(
            client,
            model=SHOWCASE_MODEL,
            input={"prompt": "Why does the sea have tides?"},
            params=params,
            metadata={"tags": [TAG], "project": "console"},
            rag={"collections": [collection], "k": 2, "mode": "keyword"},
        )
        second = _generate(
            client,
            model=SHOWCASE_MODEL,
            input={"prompt": "And why are there two high tides a day?"},
            params=params,
            parent_generation_id=first["id"],
            metadata={"tags": [TAG]},
        )
        training_job_id = _train(client)
        _batch(client)
    return Showcase(key, first, second, training_job_id)


def test_a_wrong_key_is_refused_and_a_right_one_signs_in(
    console: Console, sqlite_live: Live
) -> None:
    wrong = f"gsk_{uuid.uuid4().hex}"
    page = console.page
    page.goto(f"{console.base_url}/console")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#login-key", wrong)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("invalid, revoked or expired API key")
    expect(page.locator("#nav")).to_be_hidden()

    console.sign_in(sqlite_live.writer)
    expect(page.locator("#view h1")).to_have_text("History")
    assert page.evaluate("sessionStorage.getItem('genserve.key')") == sqlite_live.writer
    page.reload()  # the key lasts as long as the tab
    expect(page.locator("#nav")).to_be_visible()
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    console.assert_kept_secret(sqlite_live, wrong, sqlite_live.writer)


def test_the_playground_shows_tokens_as_they_stream(console: Console, sqlite_live: Live) -> None:
    page = console.page
    console.sign_in(sqlite_live.writer)
    console.open("playground")
    page.select_option("#playground-model", MODEL)
    page.fill("#playground-prompt", STREAMED_PROMPT)
    page.fill("input[name=max_tokens]", "256")
    page.fill("input[name=temperature]", "0")
    # The output's length each time the page changes it: one sample per rendering task.
    page.evaluate(
        """() => {
            const output = document.getElementById("playground-output");
            window.lengths = [];
            new MutationObserver(() => window.lengths.push(output.textContent.length))
                .observe(output, {childList: true, characterData: true, subtree: true});
        }"""
    )
    page.click("#run")
    expect(page.locator("#playground-generation")).to_be_visible(timeout=180_000)

    lengths = [n for n in page.evaluate("window.lengths") if n > 0]
    final = page.text_content("#playground-output") or ""
    assert final and lengths[-1] == len(final)
    assert len(set(lengths)) >= 2, f"the output appeared at once: {lengths}"
    assert lengths == sorted(lengths)  # it only grew
    assert int(page.get_attribute("#playground-output", "data-events") or 0) >= 2
    href = page.get_attribute("#playground-generation", "href") or ""
    generation_id = href.rsplit("/", 1)[-1]
    with sqlite_live.service.client(sqlite_live.writer) as client:
        stored = client.get(f"/v1/generations/{generation_id}").json()
    assert stored["output"] == final and stored["prompt"] == STREAMED_PROMPT
    assert stored["metadata"]["source"] == "console"
    console.assert_kept_secret(sqlite_live, sqlite_live.writer)


def test_the_playground_samples_a_trained_image_model(console: Console, sqlite_live: Live) -> None:
    page = console.page
    console.sign_in(sqlite_live.writer)
    console.open("playground")
    page.select_option("#playground-model", "digits-gan:1")
    expect(page.locator("#playground-prompt")).to_be_hidden()
    page.fill("input[name=images]", "3")
    page.click("#run")
    images = page.locator("#playground-files img")
    expect(images).to_have_count(3, timeout=180_000)
    # Fetched with the key and shown from blob: URLs, each decoded to the model's 8x8.
    for index in range(3):
        assert (images.nth(index).get_attribute("src") or "").startswith("blob:")
        expect(images.nth(index)).to_have_js_property("naturalWidth", 8)
    console.assert_kept_secret(sqlite_live, sqlite_live.writer)


def test_search_opens_a_generation_where_feedback_is_stored(
    browser: Browser, showcase: Showcase, sqlite_live: Live
) -> None:
    with _tab(browser, sqlite_live, DESKTOP) as console:
        page = console.page
        console.sign_in(showcase.key)
        console.open("search")
        page.fill("input[name=q]", "tides")
        page.select_option("select[name=mode]", "keyword")
        page.click("form[role=search] button[type=submit]")
        result = page.locator(f'#search-results a[href="#/generations/{showcase.second["id"]}"]')
        expect(result).to_be_visible()
        expect(result.locator("mark").first).to_have_text("tides")
        expect(page.locator("#search-results .hit")).to_have_count(2)

        result.click()
        expect(page.locator("#thread .turn")).to_have_count(2)
        expect(page.locator("#thread")).to_contain_text("And why are there two high tides a day?")
        answer = page.text_content("#thread .turn[aria-current] .bubble.model") or ""
        assert showcase.second["output"] in answer
        page.fill("#feedback textarea", "clear and short")
        page.click("#feedback button[data-label=good]")
        expect(page.locator("#feedback [role=status]")).to_have_text("Feedback saved.")
        expect(page.locator("#feedback .feedback-list li")).to_have_count(1)

        with sqlite_live.service.client(showcase.key) as client:
            given = client.get(f"/v1/generations/{showcase.second['id']}/feedback").json()
        assert given["count"] == 1 and given["score"] == 1.0
        assert [(f["label"], f["comment"]) for f in given["data"]] == [("good", "clear and short")]

        # The first turn was grounded: its page lists the passages it was given.
        page.click(f'#thread a[href="#/generations/{showcase.first["id"]}"]')
        expect(page.locator(".sources li")).to_have_count(2)
        expect(page.locator(".sources")).to_contain_text("Spring and neap tides")
        console.assert_kept_secret(sqlite_live, showcase.key)


# Each view, and what shows that it drew its data.
VIEWS = {
    "history": (f"history?tag={TAG}", "#history-list .card"),
    "search": ("search?q=tides&mode=keyword", "#search-results .hit"),
    "generation": ("generations/{second}", "#thread .turn"),
    "playground": ("playground", "#playground-form"),
    "jobs": ("jobs", "#jobs tbody tr"),
    "models": ("models", "#training-curves polyline"),
    "usage": ("usage", "#usage-requests rect.bar >> nth=-1"),  # today's
}
# Which screenshots become the README's pictures.
DOCS = {("generation", "desktop"): "console-desktop.png", ("search", "phone"): "console-phone.png"}


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_every_view_draws_at_desktop_and_phone_widths(
    browser: Browser, showcase: Showcase, sqlite_live: Live, tmp_path: Path, size: str
) -> None:
    with _tab(browser, sqlite_live, DESKTOP if size == "desktop" else PHONE) as console:
        console.sign_in(showcase.key)
        for name, (route, drawn) in VIEWS.items():
            console.open(route.format(second=showcase.second["id"]))
            expect(console.page.locator(drawn).first).to_be_visible()
            assert console.fits_the_width(), f"{name} is wider than the {size} screen"
            shot = console.shoot(tmp_path / f"{name}-{size}.png")
            if FOR_DOCS and (name, size) in DOCS:
                (ROOT / "docs" / DOCS[name, size]).write_bytes(shot.read_bytes())

        # The training run's curve: a line through each step it reported.
        console.open("models")
        curve = console.page.locator(f'[data-run="{showcase.training_job_id}"] polyline').first
        assert len((curve.get_attribute("points") or "").split()) >= 2
        # The batch's progress, and the jobs of the conversation.
        console.open("jobs")
        expect(console.page.locator("#batches progress")).to_have_count(1)
        for turn in (showcase.first, showcase.second):
            expect(console.page.locator(f'#jobs tr[data-job="{turn["job_id"]}"]')).to_be_visible()
        console.assert_kept_secret(sqlite_live, showcase.key)
