"""The browser page in a real headless browser: Debian's chromium driven by the playwright package.

`make test` installs chromium with apt-get when /usr/bin/chromium is missing
(`playwright install` cannot download browsers here). The page must work
offline: every request it makes goes to the server under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["serving"]
pytestmark = pytest.mark.usefixtures("release_serve_when_done")

from serving import API_KEY, sample_png  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
# The closed network refuses chromium's background connections: switch them off.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium (apt-get, as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(served, browser):
    """A page with the API key as HTTP Basic credentials, failing on script errors or foreign requests."""
    ctx = browser.new_context(http_credentials={"username": "tester", "password": API_KEY})
    pg = ctx.new_page()
    pg.set_default_timeout(90_000)
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("request", lambda r: None if r.url.startswith((served.url, "data:", "blob:"))
          else problems.append(f"foreign request: {r.url}"))
    pg.goto(served.url + "/")
    pg.wait_for_selector("body[data-ready='1']")
    yield pg
    ctx.close()
    assert not problems, problems


def canvas_png(page, selector: str) -> str:
    return page.eval_on_selector(selector, "c => c.toDataURL()")


def test_upload_overlays_concept_detail_and_segments(page, tmp_path):
    assert "256 concepts" in page.text_content("#model")
    image = tmp_path / "astronaut.png"
    image.write_bytes(sample_png("astronaut", 200))
    page.set_input_files("#file", str(image))
    page.wait_for_selector(".concept-card")
    # cards are added one by one: wait for all of them, then compare with the answer
    page.wait_for_function("() => state.explain && document.querySelectorAll('.concept-card').length"
                           " === state.explain.concepts.length")
    cards = page.locator(".concept-card")
    n = cards.count()
    assert 1 <= n <= 8
    # every top concept has its heatmap overlay, one pixel per patch, loaded as an image
    sizes = page.evaluate("() => state.explain.concepts.map(c => [c._overlay.naturalWidth, c._overlay.naturalHeight])")
    assert sizes == [[7, 7]] * n
    assert "concepts in 200×200" in page.text_content("#status")

    before = canvas_png(page, "#view")
    label = cards.nth(0).locator(".name").text_content()
    cards.nth(0).click()
    page.wait_for_selector(".concept-card.selected")
    assert canvas_png(page, "#view") != before  # the overlay is drawn over the view
    page.wait_for_selector("#detail:not([hidden]) #detail-path li")
    assert label in page.text_content("#detail-name")  # the mined name, with its id
    path = page.locator("#detail-path li")
    assert path.count() >= 1 and path.nth(path.count() - 1).text_content() == label
    assert "no concept table" not in page.text_content("#detail-meta")
    # a concept the concepts step drew a gallery for shows it; one without says so
    items = page.evaluate("async () => (await api('/v1/concepts?limit=500')).items")
    drawn = next(i["id"] for i in items if i["has_gallery"])
    bare = next(i["id"] for i in items if not i["has_gallery"])
    page.evaluate("(id) => showConcept(id)", drawn)
    page.wait_for_function("() => { const g = document.getElementById('gallery-img'); "
                           "return g && g.complete && g.naturalWidth > 100; }")
    page.evaluate("(id) => showConcept(id)", bare)
    page.wait_for_selector("#no-gallery")
    assert "No gallery" in page.text_content("#gallery")

    page.fill("#classes", "person, sky, grass")
    page.click("#segment-btn")
    page.wait_for_selector(".segment")
    segs = page.locator(".segment")
    assert 1 <= segs.count() <= 3
    assert "Segmented into" in page.text_content("#status")
    first_link = page.locator(".segment a.concept-link").first
    target = first_link.get_attribute("data-id")
    first_link.click()
    # a function, not a string: the page's CSP forbids eval, and the test keeps that CSP on
    page.wait_for_function("(id) => document.getElementById('detail').dataset.id === id", arg=target)


def test_bad_upload_shows_the_servers_error(page, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"plain text, not pixels")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#status.error")
    assert "invalid_image" in page.text_content("#status")


def test_page_needs_the_key(served, browser):
    from playwright.sync_api import Error

    ctx = browser.new_context(http_credentials={"username": "tester", "password": "wrong"})
    try:
        try:
            status = ctx.new_page().goto(served.url + "/").status
        except Error as exc:  # chromium may end the navigation itself once the server refuses the credentials
            assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
            status = 401
        assert status == 401
        assert ctx.request.get(served.url + "/").status == 401
        assert ctx.request.get(served.url + "/healthz").status == 200
    finally:
        ctx.close()
