"""The page at / in a real headless browser: a prompt typed, an image appears.

Drives Debian's Chromium with Playwright (its own browser download cannot reach
the network here).  Chromium is a system package: on a machine of ours (Debian,
root) the fixture installs it with apt-get when it is missing, and says so; elsewhere
a missing browser fails with the command to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest

from hart_fast.serve import create_app

from test_serve import FakeGenerate, _free_port

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        print("test_serve_page: installing Debian's chromium for the browser test (apt-get install chromium)")
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True)
        path = shutil.which("chromium")
        if path:
            return path
    pytest.fail("the page test needs Chromium: apt-get install chromium (Debian) or put chromium on PATH")


@pytest.fixture(scope="module")
def server():
    import uvicorn

    app = create_app(FakeGenerate(delay=0.05), model_label="tiny test model")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


def test_page_generates_an_image_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            assert "tiny test model" in page.content()
            page.fill("#prompt", "a red apple")
            page.fill("#n", "2")
            page.fill("#seed", "7")
            page.click("button[type=submit]")
            page.wait_for_selector("#gallery img:nth-child(2)", timeout=30_000)
            imgs = page.query_selector_all("#gallery img")
            assert len(imgs) == 2
            alts = sorted(img.get_attribute("alt") for img in imgs)
            assert alts == ["a red apple (seed 7)", "a red apple (seed 8)"]
            assert all(img.get_attribute("src").startswith("data:image/png;base64,") for img in imgs)
            # The images decoded in the browser: they have the generator's 4x4 size.
            sizes = page.eval_on_selector_all("#gallery img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
            assert sizes == [[4, 4], [4, 4]]
            # A refused request shows the server's message, and the page keeps working.
            page.fill("#prompt", "   ")  # passes the form's `required`, refused by the server
            page.click("button[type=submit]")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('error')")
            assert "prompt" in page.inner_text("#status") and "blank" in page.inner_text("#status")
            assert len(page.query_selector_all("#gallery img")) == 2
            page.screenshot(path=str(tmp_path / "page.png"))
        finally:
            browser.close()
