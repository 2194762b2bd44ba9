"""The REST API: answers, upload checks, concurrency, no uploads on disk."""

import base64
import io
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("fastapi.testclient", reason="the test client needs httpx2 (or httpx): pip install -e '.[dev]'")

from fastapi.testclient import TestClient  # noqa: E402

from anoseg import load  # noqa: E402
from anoseg.serve import ServeSettings, create_app  # noqa: E402


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def client(model):
    return TestClient(create_app(model, ServeSettings(max_upload_mb=4, max_pixels=2_000_000)))


@pytest.fixture(scope="module")
def image(demo_root) -> bytes:
    return next((demo_root / "test").rglob("*.png")).read_bytes()


def test_health_and_page(client, model):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["image_size"] == model.config.image_size
    assert h["image_threshold"] == model.image_threshold and h["map_threshold"] == model.map_threshold
    assert h["map_background"] == model.map_background is not None
    page = client.get("/")
    assert page.status_code == 200 and 'id="verdict"' in page.text and 'id="threshold"' in page.text
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_predict_multipart_and_raw_body_agree_with_the_model(client, model, image):
    a = client.post("/predict", files={"file": ("part.png", image, "image/png")})
    b = client.post("/predict?overlay=true", content=image, headers={"content-type": "application/octet-stream"})
    assert a.status_code == b.status_code == 200
    a, b = a.json(), b.json()
    expected = model.maps_for_batch([np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))])[0]
    assert a["score"] == pytest.approx(expected.score, abs=1e-6) and a["score"] == b["score"]
    assert a["verdict"] == ("defect" if expected.score > model.image_threshold else "normal")
    assert a["image_threshold"] == model.image_threshold and a["map_threshold"] == model.map_threshold
    levels = expected.outline_levels(model.thresholds())  # measured from the model's map background
    assert a["outline_threshold"] == pytest.approx(levels.edge) and a["outline_reach"] == pytest.approx(levels.reach)
    assert a["score_kind"] == "map_blend" and a["map_score"] == pytest.approx(0.5 * (a["max_score"] + a["topk_score"]),
                                                                             abs=2e-6)
    w, h = Image.open(io.BytesIO(image)).size
    assert a["map_size"] == [w, h] and "overlay_png" not in a
    overlay = Image.open(io.BytesIO(base64.b64decode(b["overlay_png"])))
    assert overlay.size == (w, h) and overlay.mode == "RGB"


def test_pictures_for_the_page(client, image):
    r = client.post("/predict?pictures=true", content=image).json()
    grey = Image.open(io.BytesIO(base64.b64decode(r["map_png"])))
    assert grey.mode == "L" and grey.size == tuple(r["map_size"])
    assert Image.open(io.BytesIO(base64.b64decode(r["heatmap_png"]))).size == tuple(r["map_size"])


@pytest.mark.parametrize("body,status,code", [
    (b"", 400, "empty"),
    (b"hello, I am not an image at all", 415, "not_image"),
    ("truncated", 400, "damaged"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', 415, "not_image"),  # vector: not read
    ("bomb", 413, "too_large"),
])
def test_bad_uploads_get_their_own_clear_errors(client, body, status, code):
    rng = np.random.default_rng(0)
    if body == "truncated":
        body = png(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8))[:300]
    elif body == "bomb":  # 2000 x 2000 declared, over max_pixels; compresses to a few kB
        body = png(np.zeros((2000, 2000), np.uint8))
    for r in (client.post("/predict", content=body), client.post("/predict", files={"file": ("x.png", body)})):
        assert r.status_code == status, r.text
        assert r.json()["error"] == code and r.json()["detail"]


def test_upload_over_the_size_limit(client):
    big = b"\x89PNG" + b"\0" * (5 * 1024 * 1024)
    r = client.post("/predict", content=big)
    assert r.status_code == 413 and r.json()["error"] == "too_large" and "limit" in r.json()["detail"]


def test_form_without_a_file_field(client, image):
    r = client.post("/predict", files={"picture": ("x.png", image)})
    assert r.status_code == 422 and r.json()["error"] == "no_file"


def test_concurrent_requests_get_their_own_answers(client, model):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8) for i in range(12)]
    expected = [p.score for p in model.maps_for_batch(images)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda im: client.post("/predict", content=png(im)).json(), images))
    assert [a["score"] for a in answers] == pytest.approx(expected, abs=1e-6)
    assert [a["map_size"] for a in answers] == [[50, 40 + 7 * i] for i in range(12)]


def test_uploads_never_touch_the_disk(client, monkeypatch, tmp_path):
    def no_disk(self):
        raise AssertionError("an upload was spooled to a temporary file")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", no_disk)
    noise = np.random.default_rng(4).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    data = png(noise)
    assert len(data) > 2 * 1024 * 1024  # above Starlette's default in-memory limit of 1 MB
    r = client.post("/predict", files={"file": ("big.png", data, "image/png")})
    assert r.status_code == 200, r.text


def test_save_uploads_when_asked(model, image, tmp_path):
    client = TestClient(create_app(model, ServeSettings(save_uploads=str(tmp_path / "kept"))))
    r = client.post("/predict", files={"file": ("../../evil name.png", image)})
    assert r.status_code == 200
    kept = list((tmp_path / "kept").iterdir())
    assert [p.name for p in kept] == [r.json()["saved_as"]] and kept[0].read_bytes() == image
    assert kept[0].name.endswith("_evil_name.png")


def test_saved_uploads_never_overwrite_earlier_ones(model, image, tmp_path):
    for _ in range(2):  # two server starts into the same folder
        client = TestClient(create_app(model, ServeSettings(save_uploads=str(tmp_path / "kept"))))
        for _ in range(3):
            assert client.post("/predict", files={"file": ("a.png", image)}).status_code == 200
    assert len(list((tmp_path / "kept").iterdir())) == 6


def test_unwritable_uploads_folder(model, image, tmp_path):
    import os

    from anoseg.errors import OutputError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create the output folder"):
        create_app(model, ServeSettings(save_uploads=str(blocker / "kept")))
    folder = tmp_path / "kept"
    client = TestClient(create_app(model, ServeSettings(save_uploads=str(folder))))
    folder.rmdir()
    blocker2 = folder  # the folder vanishes and a file takes its place while the server runs
    blocker2.write_text("x")
    r = client.post("/predict", files={"file": ("a.png", image)})
    body = r.json()
    assert r.status_code == 200 and body["verdict"] in ("normal", "defect")  # the verdict is not lost
    assert body["saved_as"] is None and "cannot" in body["save_error"]
    if os.geteuid() != 0:  # root writes anywhere: the permission check means nothing there
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="not writable"):
            create_app(model, ServeSettings(save_uploads=str(ro)))


def test_bad_settings():
    from anoseg.errors import AnosegError

    with pytest.raises(AnosegError, match="max-upload-mb"):
        ServeSettings(max_upload_mb=0)


def test_fuzzed_uploads_get_json_answers(client):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=40, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.binary(max_size=2048), st.booleans())
    def check(data, as_form):
        r = (client.post("/predict", files={"file": ("f.png", data)}) if as_form
             else client.post("/predict", content=data))
        assert r.status_code in (200, 400, 413, 415), r.text
        body = r.json()
        assert ("score" in body) if r.status_code == 200 else (body["error"] and body["detail"])

    check()


def test_api_docs_work_offline(client):
    pytest.importorskip("swagger_ui_bundle")
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "http://" not in page.text and "https://" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = client.get(f"/docs-assets/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000
    assert client.get("/openapi.json").json()["paths"]["/predict"]


def _counting(real, delay: float):
    """`real`, slowed down, recording how many calls run at once."""
    import threading
    import time

    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    def counted(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(delay)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    return counted, state


def test_many_uploads_at_once_are_decoded_a_few_at_a_time(model, image, monkeypatch):
    import anoseg.serve

    # decoding happens outside the model's lock: it is what took gigabytes with many large uploads at once
    decode, state = _counting(anoseg.serve.load_image_bytes, 0.05)
    monkeypatch.setattr(anoseg.serve, "load_image_bytes", decode)
    client = TestClient(create_app(model, ServeSettings(max_concurrent=2)))
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda _: client.post("/predict", files={"file": ("a.png", image)}).status_code,
                              range(12)))
    assert codes == [200] * 12 and state["most"] == 2


def test_requests_that_wait_too_long_get_a_json_503(model, image, monkeypatch):
    import anoseg.serve

    decode, _ = _counting(anoseg.serve.load_image_bytes, 0.3)
    monkeypatch.setattr(anoseg.serve, "load_image_bytes", decode)
    client = TestClient(create_app(model, ServeSettings(max_concurrent=1, busy_timeout_s=0.05)))
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: client.post("/predict", files={"file": ("a.png", image)}), range(6)))
    codes = [a.status_code for a in answers]
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    busy = next(a.json() for a in answers if a.status_code == 503)
    assert busy["error"] == "busy" and "try again" in busy["detail"]


def test_blended_map_score_is_named_and_judged(tiny_model_copy, image):
    from anoseg import calibrate

    calibrate(tiny_model_copy, overrides={"image_score_topk_weight": 0.0})
    peak = load(tiny_model_copy, device="cpu")
    answer = TestClient(create_app(peak, ServeSettings())).post("/predict", content=image).json()
    assert answer["score_kind"] == "map_max" and answer["score"] == answer["map_score"] == answer["max_score"]
    calibrate(tiny_model_copy, overrides={"image_score_topk_weight": 0.5})
    blended = load(tiny_model_copy, device="cpu")
    answer = TestClient(create_app(blended, ServeSettings())).post("/predict", content=image).json()
    assert answer["score_kind"] == "map_blend" and answer["score"] == answer["map_score"]
    assert answer["map_score"] == pytest.approx(0.5 * (answer["max_score"] + answer["topk_score"]), abs=2e-6)
    assert answer["verdict"] == ("defect" if answer["score"] > blended.image_threshold else "normal")
    assert answer["image_threshold"] == blended.image_threshold


def test_every_type_predict_reads_is_taken_as_an_upload_too(client):
    rng = np.random.default_rng(0)
    for kind in ("GIF", "WEBP", "PPM"):
        r = client.post("/predict", content=png(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), kind))
        assert r.status_code == 200, (kind, r.text)


def test_memory_held_after_a_burst_does_not_grow_with_the_burst(model):
    """Requests hold their upload's bytes, not decoded images, and nothing stays behind after the answers."""
    import gc
    import tracemalloc

    upload = png(np.random.default_rng(0).integers(0, 256, (500, 500, 3), dtype=np.uint8))
    client = TestClient(create_app(model, ServeSettings(max_concurrent=1, max_upload_mb=8, busy_timeout_s=600)))

    def burst(n: int) -> int:
        with ThreadPoolExecutor(n) as pool:
            codes = list(pool.map(lambda _: client.post("/predict?pictures=true",
                                                        files={"file": ("a.png", upload)}).status_code, range(n)))
        assert codes == [200] * n
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        burst(1)  # first-call caches
        after_one, after_six = burst(1), burst(6)
    finally:
        tracemalloc.stop()
    decoded = 500 * 500 * 3
    assert after_six - after_one < decoded  # six decoded images and their maps would show here
