"""The HTML report: self-contained, and it opens in headless Chromium without errors."""

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from insight.report import Figure, Section, write_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _png(path: Path, seed: int) -> Path:
    rgb = np.random.default_rng(seed).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _report(tmp_path: Path) -> Path:
    sections = [
        Section("Sweep", "four trials", figures=[Figure(_png(tmp_path / "a.png", 0), "Pareto <front>")],
                table=[{"trial": "k=8", "val_fvu": 0.31234, "pareto": True},
                       {"trial": "k=4", "val_fvu": "0.5570743076062101", "tokens": 29400.0, "pareto": None}]),
        Section("Concepts", figures=[Figure(tmp_path / "missing.png", "not drawn")], code="insight concepts"),
    ]
    return write_report(tmp_path / "out" / "report.html", "Test report", "summary & more", sections,
                        {"model": "models:/insight@champion"})


def test_report_is_self_contained(tmp_path):
    html = _report(tmp_path).read_text()
    assert html.count("data:image/png;base64,") == 1  # the figure is inline
    assert "Pareto &lt;front&gt;" in html and "summary &amp; more" in html  # escaped
    assert "missing: " in html and "<td>0.312</td>" in html and "0.31234" not in html  # rounded for reading
    assert "<td>0.557</td>" in html and "<td>29,400</td>" in html  # numbers read from CSV text, thousands
    assert "None" not in html  # a missing value is a dash
    assert "http://" not in html and "https://" not in html  # nothing fetched from the network
    assert not list((tmp_path / "out").glob(".*.tmp"))


def open_in_chromium(path: Path, shot: Path) -> tuple[dict, list[str]]:
    """Open an HTML file in headless Chromium, screenshot it; (page facts, console and page errors)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is missing: `make test` installs it (apt-get install chromium)"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri())
            facts = {
                "title": page.title(),
                "images": page.locator("figure img").count(),
                # every inline picture decoded to a real bitmap
                "widths": page.evaluate("[...document.querySelectorAll('figure img')].map(i => i.naturalWidth)"),
                "text": page.inner_text("body"),
            }
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    return facts, errors


def test_report_opens_in_headless_chromium(tmp_path):
    facts, errors = open_in_chromium(_report(tmp_path), tmp_path / "report.png")
    assert facts["title"] == "Test report" and facts["images"] == 1
    assert facts["widths"] == [90]  # the inline PNG decoded
    assert not errors, errors
    assert (tmp_path / "report.png").stat().st_size > 5000
