"""A person using the explorer in a real browser: Debian's Chromium, driven headless.

Playwright for Python drives the system Chromium (``executable_path``: it never
downloads a browser) against ``agents-sessions ui`` run for real on the seeded
PostgreSQL database. The test reads what is on screen, clicks what a person clicks,
fails on any console error (a CSP violation is one) or JavaScript dialog, and saves a
screenshot of each page: into ``build/ui-screenshots/``, or the directory named by
``EXPLORER_SCREENSHOTS`` (the README's images are made that way).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ui.seed import (
    BULK_USER,
    HOSTILE_CONVERSATION,
    HOSTILE_TEXT,
    WEATHER_CONVERSATION,
    SeededDatabase,
)
from tests.ui.server import running_explorer

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPOSITORY = Path(__file__).resolve().parents[2]


def _missing(what: str) -> None:
    message = f"the browser test needs {what}"
    if os.environ.get("CI") == "true" or os.environ.get("AGENTS_SESSIONS_REQUIRE_POSTGRES"):
        pytest.fail(message + " (CI: .ci/run installs it)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """The system Chromium, launched headless through Playwright."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        _missing("Chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def screenshots() -> Path:
    """Where this run's screenshots go."""
    directory = Path(
        os.environ.get("EXPLORER_SCREENSHOTS") or REPOSITORY / "build" / "ui-screenshots"
    )
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.mark.parametrize("seeded", ["postgresql"], indirect=True)
def test_a_person_browses_conversations_a_transcript_and_usage(
    seeded: SeededDatabase, chromium: Any, screenshots: Path
) -> None:
    from playwright.sync_api import expect

    console_errors: list[str] = []
    dialogs: list[str] = []
    with running_explorer(seeded.url) as explorer:
        context = chromium.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()

        def on_console(message: Any) -> None:
            if message.type == "error":
                console_errors.append(message.text)

        def on_dialog(dialog: Any) -> None:
            dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("console", on_console)
        page.on("pageerror", lambda error: console_errors.append(str(error)))
        page.on("dialog", on_dialog)

        # The conversation list: newest first, a page of rows, a way to the next page.
        page.goto(explorer.base_url + "/")
        expect(page.get_by_role("heading", name="Conversations")).to_be_visible()
        expect(page.locator("table.listing tbody tr")).to_have_count(50)
        expect(page.get_by_role("link", name="Older »")).to_be_visible()
        page.screenshot(path=screenshots / "explorer-conversations.png")

        # Filter by a user, then open one of the conversations.
        page.get_by_label("User").fill(BULK_USER)
        page.get_by_role("button", name="Filter").click()
        expect(page.locator("table.listing tbody tr").first).to_contain_text(BULK_USER)
        page.get_by_label("User").fill("alice")
        page.get_by_role("button", name="Filter").click()
        expect(page.locator("table.listing tbody tr")).to_have_count(1)
        page.get_by_role("link", name=WEATHER_CONVERSATION).click()

        # The transcript: question, folded tool call, answer; the stored JSON one click away.
        expect(page.get_by_role("heading", name=WEATHER_CONVERSATION)).to_be_visible()
        expect(page.get_by_text("What's the weather in Paris?", exact=True)).to_be_visible()
        expect(page.get_by_text("It is 18°C and sunny in Paris.", exact=True)).to_be_visible()
        output = page.get_by_text("18°C and sunny in Paris", exact=True)
        expect(output).to_be_hidden()  # folded until asked for
        page.locator("article.tool summary").first.click()
        expect(output).to_be_visible()
        expect(page.locator("article.tool pre.json").first).to_contain_text('"city": "Paris"')
        first_raw = page.locator("details.raw").first
        expect(first_raw.locator("pre")).to_be_hidden()
        first_raw.locator("summary").click()
        expect(first_raw.locator("pre")).to_contain_text('"role":"user"')
        expect(page.get_by_role("cell", name="gpt-4.1", exact=True)).to_be_visible()
        page.screenshot(path=screenshots / "explorer-conversation.png", full_page=True)

        with page.expect_download() as download:
            page.get_by_role("link", name="Download as JSON Lines").click()
        assert download.value.suggested_filename == f"{WEATHER_CONVERSATION}.jsonl"

        # Stored markup is text on screen, and runs nothing.
        page.goto(explorer.base_url + "/")
        page.get_by_role("link", name=HOSTILE_CONVERSATION).click()
        expect(page.get_by_text(HOSTILE_TEXT, exact=True).first).to_be_visible()

        # Usage: charts drawn by the browser from the page's own SVG; the window switches.
        page.get_by_role("navigation").get_by_role("link", name="Usage").click()
        expect(page.get_by_role("heading", name="Usage", exact=True)).to_be_visible()
        expect(page.get_by_role("img", name="Tokens per model per day")).to_be_visible()
        assert page.locator("svg rect.bar").count() >= 4
        page.get_by_role("link", name="30 days").click()
        expect(page.get_by_text("active in the last 30 days")).to_be_visible()
        page.screenshot(path=screenshots / "explorer-usage.png", full_page=True)
        page.get_by_role("link", name="24 hours").click()
        expect(page.get_by_role("img", name="Tokens per model per hour")).to_be_visible()
        expect(page.get_by_text("active in the last 24 hours")).to_be_visible()
        context.close()
    assert console_errors == []
    assert dialogs == []
