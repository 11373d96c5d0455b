"""The console's files as the API serves them: the page with its security headers, the
scripts and styles with their types, and 404 as the API's JSON error for anything else."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.console import routes as console


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    """The whole app, without its lifespan: the console needs no database or broker."""
    return TestClient(create_app(Settings(data_dir=tmp_path_factory.mktemp("console"))))


def test_the_console_is_not_part_of_the_api_schema(client: TestClient) -> None:
    assert not [path for path in client.get("/openapi.json").json()["paths"] if "console" in path]


def test_the_page_has_a_strict_content_security_policy(client: TestClient) -> None:
    page = client.get("/console")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = dict(
        part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"
    assert policy["form-action"] == "'none'"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["cache-control"] == "no-store"
    # No inline script or handler: everything runs from the module the page loads.
    assert '<script type="module" src="/console/static/app.js"></script>' in page.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text)
    assert not re.search(r"\son[a-z]+=", page.text)


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("app.js", "text/javascript; charset=utf-8"),
        ("api.js", "text/javascript; charset=utf-8"),
        ("console.css", "text/css; charset=utf-8"),
        ("icon.svg", "image/svg+xml"),
    ],
)
def test_assets_are_served_with_their_types(
    client: TestClient, name: str, content_type: str
) -> None:
    answer = client.get(f"/console/static/{name}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == content_type
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.content == (console.STATIC_DIR / name).read_bytes()


def test_every_module_the_scripts_import_is_served(client: TestClient) -> None:
    scripts = sorted(console.STATIC_DIR.glob("*.js"))
    imported = {
        name
        for script in scripts
        for name in re.findall(r'from "\./([\w-]+\.js)"', script.read_text())
    }
    assert imported, "the scripts import one another"
    for name in imported:
        assert client.get(f"/console/static/{name}").status_code == 200, name


@pytest.mark.parametrize(
    "name", ["nothere.js", "index.html", "..%2Froutes.py", "%2e%2e%2f__init__.py", "a/b.js"]
)
def test_anything_else_is_a_json_404(client: TestClient, name: str) -> None:
    answer = client.get(f"/console/static/{name}")
    assert answer.status_code == 404
    assert answer.json()["error"]["type"] == "not_found_error"
