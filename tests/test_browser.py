"""End to end in a real browser: headless Chromium opens the inspection page, uploads an image, and sees
the verdict and the overlay. The screenshot is kept in test-artifacts/ (or $ANOSEG_TEST_ARTIFACTS).
"""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")

from anoseg import load  # noqa: E402
from anoseg.serve import ServeSettings, create_app  # noqa: E402

CHROMIUM = os.environ.get("ANOSEG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it",
                allow_module_level=True)
ARTIFACTS = Path(os.environ.get("ANOSEG_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def server(model):
    port = free_port()
    app = create_app(model, ServeSettings(port=port))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    end = time.monotonic() + 20
    while not srv.started and time.monotonic() < end:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def canvas_green_pixels(page, canvas_id: str) -> int:
    return page.evaluate("""(id) => {
        const c = document.getElementById(id), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] === 0 && d[i + 1] === 255 && d[i + 2] === 0) n++;
        return n; }""", canvas_id)


def test_upload_shows_verdict_overlay_and_slider_redraws_without_a_new_upload(server, browser, demo_root, model):
    defect = sorted((demo_root / "test").glob("[!g]*/*.png"))[0]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server)
    page.set_input_files("#file", str(defect))
    page.wait_for_function("document.body.dataset.state === 'done'", timeout=30000)
    verdict = page.inner_text("#verdict")
    assert verdict in ("PASS", "DEFECT")
    assert page.get_attribute("#verdict", "class") == ("pass" if verdict == "PASS" else "defect")
    shown = float(page.inner_text("#score"))  # the page shows the model's own image score, to 4 places
    expected = model.maps_for_batch([np.asarray(Image.open(defect).convert("RGB"))])[0].score
    assert shown == pytest.approx(expected, abs=6e-5)
    size = page.evaluate("[document.getElementById('overlay').width, document.getElementById('overlay').height]")

    assert size == list(Image.open(defect).size)
    assert page.evaluate("document.getElementById('original').naturalWidth") == size[0]

    # slider at 0: every pixel is over it, so the image border is outlined; at 1: nothing is. The slider
    # moves the outlines only: the verdict stays the image score against the image threshold
    page.eval_on_selector("#threshold", "e => { e.value = 0; e.dispatchEvent(new Event('input')); }")
    low = canvas_green_pixels(page, "regions")
    assert page.inner_text("#verdict") == verdict
    page.eval_on_selector("#threshold", "e => { e.value = 1; e.dispatchEvent(new Event('input')); }")
    assert low > 0 and canvas_green_pixels(page, "regions") == 0
    assert page.inner_text("#verdict") == verdict and page.inner_text("#threshold-value") == "1.000"
    assert len(posts) == 1, posts  # the slider never uploads again

    page.eval_on_selector("#threshold", "e => { e.value = 0.5; e.dispatchEvent(new Event('input')); }")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "inspection_page.png"), full_page=True)
    assert (ARTIFACTS / "inspection_page.png").stat().st_size > 10_000
    assert not errors, errors
    page.close()


def test_the_page_outlines_the_regions_the_server_does(server, browser):
    """The page's own outline (regions above the edge that reach the reach level) against anoseg.scoring's."""
    from anoseg.scoring import OutlineLevels, outline_region

    amap = np.zeros((20, 40), np.uint8)
    amap[2:6, 2:6] = 204  # the peak's region
    amap[12:16, 12:16] = 128  # above the edge, short of the reach: not outlined
    amap[2:6, 30:34] = 191  # reaches: outlined
    amap[6, 6] = 100  # a diagonal neighbour of the peak's region, above the edge: part of it
    page = browser.new_page()
    page.goto(server)
    for edge, reach in ((0.31, 0.71), (0.31, 0.0), (0.61, 0.71), (0.91, 0.95)):
        drawn = page.evaluate("([m, w, h, t, r]) => Array.from(outlineRegions(Uint8ClampedArray.from(m), w, h, t, r))",
                              [amap.ravel().tolist(), 40, 20, edge, reach])
        # the page reads the map as 8-bit levels: the server's rule on those levels
        levels = OutlineLevels(round(edge * 255) / 255, max(round(edge * 255), round(reach * 255)) / 255)
        expected = outline_region(amap / 255, levels)
        assert np.array_equal(np.array(drawn, bool).reshape(20, 40), expected), (edge, reach)
    page.close()


def test_a_bad_upload_shows_the_server_error(server, browser, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a picture")
    page = browser.new_page()
    page.goto(server)
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.body.dataset.state === 'error'", timeout=30000)
    text = page.inner_text("#error")
    assert "broken.png" in text and ("not an image" in text or "damaged" in text)
    assert page.is_hidden("#panels")
    page.close()
