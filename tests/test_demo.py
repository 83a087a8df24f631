"""`unix demo`: the page's actions as functions, and the real page driven in headless Chromium.

The browser test needs Debian's chromium (`apt-get install chromium`; UNIX_CHROMIUM names another
binary) and the `playwright` package; it is skipped, saying which is missing, only where they are
not installed. UNIX_SCREENSHOTS=DIR keeps its screenshots (docs/demo.png is one of them).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from unix.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pleural_effusion.png"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def demo():
    pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'unix[demo]'")
    from unix.demo.app import Demo
    from unix.infer import load_pipeline

    return Demo(load_pipeline(None, "cpu"))


def test_report_and_generate_actions(demo, tmp_path):
    text = demo.report(str(EXAMPLE), "")
    assert text.startswith("FINDINGS:")
    assert demo.preview(str(EXAMPLE)).shape == (256, 256)
    image = demo.generate("FINDINGS: Large left pleural effusion. IMPRESSION: Large left pleural effusion.", 3, 4.0, 6, "256")
    assert image.shape == (256, 256) and image.dtype == np.uint8 and image.std() > 0
    again = demo.generate("FINDINGS: Large left pleural effusion. IMPRESSION: Large left pleural effusion.", 3, 4.0, 6, "256")
    assert np.array_equal(image, again)  # seeded
    seen = []
    demo.generate("No acute process.", 1, 2.0, 6, "256", lambda fraction, desc: seen.append(fraction))
    assert seen == [k / 5 for k in range(1, 6)]  # the page's progress bar: one update per denoising step


def test_far_input_is_flagged_in_the_page(demo, tmp_path):
    from PIL import Image

    strip = tmp_path / "strip.png"  # 1 x 300: nothing like the 256 px phantom images the model saw
    Image.fromarray(np.full((1, 300), 128, np.uint8)).save(strip)
    text = demo.report(str(strip), "")
    assert text.startswith("Note: this image is far from the images") and "aspect ratio" in text
    assert "FINDINGS:" in text  # flagged, never refused
    assert not demo.report(str(EXAMPLE), "").startswith("Note:")


@pytest.mark.parametrize("call, message", [
    (lambda d, bad: d.report(None, ""), "upload a chest X-ray"),
    (lambda d, bad: d.report(str(bad), ""), "not a readable image"),
    (lambda d, bad: d.generate("  ", 0, 2.0, 10, "256"), "write a prompt"),
    (lambda d, bad: d.generate("No effusion.", -1, 2.0, 10, "256"), "seed"),
    (lambda d, bad: d.generate("No effusion.", 0, float("nan"), 10, "256"), "guidance"),
    (lambda d, bad: d.generate("No effusion.", 0, 2.0, 1, "256"), "steps"),
    (lambda d, bad: d.generate("No effusion.", 0, 2.0, 10, "100"), "size"),
])
def test_bad_inputs_become_messages(demo, tmp_path, call, message):
    bad = tmp_path / "upload.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match=message):
        call(demo, bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser() -> str:
    pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright: pip install playwright")
    pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'unix[demo]'")
    chromium = os.environ.get("UNIX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no chromium: apt-get install chromium (or set UNIX_CHROMIUM)")
    return chromium


@pytest.fixture(scope="module")
def server():
    chromium = _browser()
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "unix.cli", "demo", "--port", str(port), "--device", "cpu"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"unix demo exited: {proc.stdout.read()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("unix demo did not answer within 120 s")
        yield url, chromium
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_demo_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, chromium = server
    shots = Path(os.environ.get("UNIX_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(url, wait_until="networkidle")

        # Report tab: upload an example, write its report
        page.locator("#report-image input[type=file]").set_input_files(str(EXAMPLE))
        page.locator("#report-preview img").first.wait_for(timeout=30000)  # shown as the model reads it
        page.click("#report-button")
        page.wait_for_function("() => (document.querySelector('#report-text textarea') || {}).value?.startsWith('FINDINGS:')",
                               timeout=60000)
        report = page.locator("#report-text textarea").input_value()
        assert "IMPRESSION" in report or len(report) > 20
        page.wait_for_timeout(500)
        page.screenshot(path=str(shots / "demo-report.png"))

        # a bad upload is a message in the page, and the page keeps working
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"\x89PNG not really")
        page.locator("#report-image button[aria-label='Clear']").first.click()
        page.locator("#report-image input[type=file]").set_input_files(str(bad))
        page.click("#report-button")
        page.get_by_text("broken.png: not a readable image").first.wait_for(timeout=30000)  # the upload's own name
        assert not page.get_by_text("Traceback").count()
        page.keyboard.press("Escape")

        # Generate tab: a prompt, an image
        page.get_by_role("tab", name="Generate").click()
        page.fill("#generate-prompt textarea", "FINDINGS: Large left pleural effusion. IMPRESSION: Large left pleural effusion.")
        page.click("#generate-button")
        page.locator("#generate-image img").first.wait_for(timeout=120000)
        assert page.locator("#generate-image img").first.get_attribute("src")
        page.screenshot(path=str(shots / "demo-generate.png"))
        browser.close()
    assert (shots / "demo-report.png").stat().st_size > 0 and (shots / "demo-generate.png").stat().st_size > 0
