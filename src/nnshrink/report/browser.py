"""Open a report page in headless Chromium and say what a reader would see.

Used by the tests (a page with a console error, a request off the machine or an empty plot
fails) and to take the README's screenshot::

    python -m nnshrink.report.browser R.html --screenshot docs/report.png

Playwright drives the browser (``pip install playwright``); the browser is Debian's
``chromium`` (``/usr/bin/chromium``, or ``NNSHRINK_CHROMIUM``), so no browser is downloaded.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from nnshrink.errors import ConfigError

#: The viewport pages are opened in (a laptop screen).
VIEWPORT = {"width": 1280, "height": 900}


def chromium() -> str | None:
    """The Chromium executable to use, or None where there is none."""
    given = os.environ.get("NNSHRINK_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def inspect(page: str | Path, screenshot: str | Path | None = None, click: str | None = None) -> dict:
    """Load ``page`` from disk and report what happened.

    Returns ``problems`` (console errors and warnings, uncaught exceptions, failed loads and any
    request that is not for the file itself: the page must be self-contained), ``plots`` (each
    ``figure.plot``: its name and the drawn size of its SVG), ``size`` (the page's full width and
    height in CSS pixels) and, with ``click`` (a CSS selector), ``clicked``: the first column of
    the clicked table's rows before and after one click on it. With ``screenshot``, the whole
    page is written there as PNG.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ConfigError("checking a page in a browser needs playwright: pip install playwright") from None
    exe = chromium()
    if exe is None:
        raise ConfigError("no Chromium found (install Debian's chromium, or set NNSHRINK_CHROMIUM)")
    uri = Path(page).resolve().as_uri()
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport=VIEWPORT)
            tab.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                   if m.type in ("error", "warning") else None)
            tab.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
            tab.on("requestfailed", lambda r: problems.append(f"failed to load {r.url}"))
            tab.on("request", lambda r: None if r.url == uri or r.url.startswith("data:")
                   else problems.append(f"request off the page: {r.url}"))
            tab.goto(uri, wait_until="load")
            plots = tab.eval_on_selector_all(
                "figure.plot", """els => els.map(e => { const s = e.querySelector('svg');
                    const r = s ? s.getBoundingClientRect() : {width: 0, height: 0};
                    return {name: e.dataset.plot, width: r.width, height: r.height,
                            shapes: s ? s.querySelectorAll('path, rect, text, use').length : 0}; })""")
            size = tab.evaluate("() => ({width: document.documentElement.scrollWidth, "
                                "height: document.documentElement.scrollHeight})")
            out = {"problems": problems, "plots": plots, "size": size}
            if click is not None:
                column = """(sel) => { const t = document.querySelector(sel).closest('table');
                    return Array.from(t.tBodies[0].rows).map(r => r.cells[0].textContent); }"""
                first = tab.evaluate(column, click)
                tab.click(click)
                out["clicked"] = {"before": first, "after": tab.evaluate(column, click)}
            if screenshot is not None:
                tab.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page")
    parser.add_argument("--screenshot")
    args = parser.parse_args(argv)
    try:
        seen = inspect(args.page, args.screenshot)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in seen["plots"]:
        print(f"plot {p['name']}: {p['width']:.0f} x {p['height']:.0f} px, {p['shapes']} shapes")
    print(f"page: {seen['size']['width']} x {seen['size']['height']} px")
    for p in seen["problems"]:
        print(f"problem: {p}")
    return 1 if seen["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
