"""A REST API and an inspection web page for a trained model (FastAPI, served by uvicorn).

``POST /predict`` takes an image (multipart field ``file``, or the raw bytes as the body) and returns the
score, the verdict and, on request, PNG pictures. Uploads are held in memory only, checked for size,
pixel count and real image type, and refused with a JSON error that says what is wrong.
"""


import base64
import ctypes
import io
import math
import secrets
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
from PIL import Image

from .errors import AnosegError, DataError, ImageError, OutputError
from .fileio import READABLE_FORMATS, load_image_bytes, make_output_dir, safe_name, write_bytes_atomic
from .inference import AnoSegModel
from .visualize import map_to_uint8, overlay

STATUS = {"empty": 400, "damaged": 400, "no_pixels": 400, "not_image": 415, "too_large": 413}


@dataclass
class ServeSettings:
    """Limits and options of the server (command line: anoseg serve --help)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 20.0  # larger bodies are refused with 413 before they are read to the end
    max_pixels: int = 40_000_000  # declared width x height above this is refused (decompression bombs)
    save_uploads: str | None = None  # folder to keep uploads in; None: uploads never touch the disk
    max_concurrent: int = 1  # images decoded and mapped at the same time; memory is bounded by this, not by clients
    busy_timeout_s: float = 60.0  # a request that waits longer for its turn is answered 503 "busy"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_upload_mb) and self.max_upload_mb > 0):
            raise AnosegError(f"--max-upload-mb {self.max_upload_mb}: must be a positive number")
        if self.max_pixels < 1:
            raise AnosegError(f"--max-pixels {self.max_pixels}: must be at least 1")
        if self.max_concurrent < 1:
            raise AnosegError(f"--max-concurrent {self.max_concurrent}: must be at least 1")
        if not self.busy_timeout_s > 0:
            raise AnosegError(f"busy_timeout_s {self.busy_timeout_s}: must be positive")
        if not 0 <= self.port <= 65535:
            raise AnosegError(f"--port {self.port}: must lie in 0..65535")

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class UploadError(Exception):
    """A bad upload: answered with `status` and a JSON body {"error": code, "detail": message}."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def png_b64(rgb_or_grey: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb_or_grey).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def release_freed_memory() -> None:
    """Give freed heap memory back to the system. glibc keeps the pages of a large decode in the arena of the
    thread that made it, so after a burst of large uploads the server would go on holding them."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # another C library: nothing to trim
            pass


class Inspector:
    """The model behind the server: one image in, one result out; safe to call from several threads."""

    def __init__(self, model: AnoSegModel, settings: ServeSettings) -> None:
        self.model = model
        self.settings = settings
        self.lock = threading.Lock()  # one forward pass at a time: torch modules are not re-entrant
        # decoding a small file can take gigabytes (a solid 6000 x 6000 PNG is 120 KB): only a few at a time
        self.slots = threading.BoundedSemaphore(settings.max_concurrent)
        self.thresholds = model.thresholds()
        # the map's image score: its maximum, or that blended with its top-k mean (image_score_topk_weight)
        if settings.save_uploads:
            check_writable(Path(settings.save_uploads))

    def predict(self, data: bytes, name: str, overlay_png: bool = False, pictures: bool = False) -> dict[str, Any]:
        if not self.slots.acquire(timeout=self.settings.busy_timeout_s):
            raise UploadError(503, "busy", f"the server is busy: {self.settings.max_concurrent} image(s) in work "
                              f"and no turn within {self.settings.busy_timeout_s:g} s; try again")
        try:
            return self._predict(data, name, overlay_png, pictures)
        finally:
            self.slots.release()
            release_freed_memory()

    def _predict(self, data: bytes, name: str, overlay_png: bool, pictures: bool) -> dict[str, Any]:
        try:
            image = load_image_bytes(data, name or "upload", self.settings.max_pixels, formats=READABLE_FORMATS)
        except ImageError as e:
            raise UploadError(STATUS.get(e.reason, 400), e.reason, str(e)) from None
        except DataError as e:
            raise UploadError(400, "bad_image", str(e)) from None
        with self.lock:
            pred = self.model.maps_for_batch([image])[0]
        saved = self.save_upload(data, name) if self.settings.save_uploads else {}
        h, w = image.shape[:2]
        region = pred.outline(self.thresholds)
        result: dict[str, Any] = {
            **pred.to_record(self.thresholds),
            "score_kind": "detector" if pred.detector_score is not None else self.model.scorer.kind, "map_size": [w, h],
            "defect_fraction": None if region is None else round(float(region.mean()), 6), **saved,
        }
        if overlay_png or pictures:
            result["overlay_png"] = png_b64(overlay(image, pred.anomaly_map, region))
        if pictures:  # what the page needs to re-draw outlines at any threshold without a new upload
            result["heatmap_png"] = png_b64(overlay(image, pred.anomaly_map, None))
            result["map_png"] = png_b64(map_to_uint8(pred.anomaly_map))
        return result


    def save_upload(self, data: bytes, name: str) -> dict[str, Any]:
        """Keep an upload under a name that never collides (UTC time + random); a failure is reported, not raised."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        file = f"{stamp}_{secrets.token_hex(4)}_{safe_name(name or 'upload')}"
        try:
            write_bytes_atomic(make_output_dir(self.settings.save_uploads) / file, data)
        except AnosegError as e:
            return {"saved_as": None, "save_error": str(e)}
        return {"saved_as": file}


def _swagger_assets() -> Path | None:
    """Swagger UI's files from the swagger-ui-bundle package, so /docs works without internet."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def _offline_docs(app, assets: Path) -> None:
    """/docs served from this machine (FastAPI's default loads Swagger UI from a CDN: blank on a closed network)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="anoseg API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


def check_writable(folder: Path) -> None:
    """At start-up: the uploads folder exists (or can be made) and takes files."""
    make_output_dir(folder)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".anoseg-write-check-"):
            pass
    except OSError as e:
        raise OutputError(f"{folder}: --save-uploads folder is not writable ({e.strerror or e})") from None


def page_html() -> str:
    return resources.files("anoseg").joinpath("web/index.html").read_text(encoding="utf-8")


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is over `limit` (plus multipart framing)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:  # multipart framing allowance
        raise UploadError(413, "too_large", f"upload of {int(declared)} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit + 64 * 1024:
            raise UploadError(413, "too_large", f"upload is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def upload_from(request: Any, settings: ServeSettings) -> tuple[bytes, str]:
    """(bytes, name) of the upload: the multipart field ``file``, or the raw body (name from X-Filename)."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    body = await read_body(request, settings.max_bytes)
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        return body, unquote(request.headers.get("x-filename", "upload"))  # safe_name shortens it

    async def stream():
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=1, max_fields=10,
                             max_part_size=settings.max_bytes + 1)
    parser.spool_max_size = len(body) + 1  # keep file parts in memory: uploads never touch the disk
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise UploadError(400, "bad_form", f"cannot read the form: {e.message}") from None
    file = form.get("file")
    if file is None or isinstance(file, str):
        raise UploadError(422, "no_file", "the form has no file field named 'file'")
    return await file.read(), file.filename or "upload"


def create_app(model: AnoSegModel | str | Path, settings: ServeSettings | None = None):
    """The FastAPI application for a model (or a model folder)."""
    try:
        from fastapi import FastAPI, Query, Request
        from fastapi.responses import HTMLResponse, JSONResponse
        from starlette.concurrency import run_in_threadpool
    except ImportError:
        raise AnosegError("the server needs FastAPI: pip install 'anoseg[deploy]'") from None

    settings = settings or ServeSettings()
    if not isinstance(model, AnoSegModel):
        model = AnoSegModel.load(model)
    inspector = Inspector(model, settings)
    assets = _swagger_assets()
    app = FastAPI(title="anoseg", version="1", description="Anomaly maps and defect verdicts for images.",
                  **({"docs_url": None, "redoc_url": None} if assets else {}))
    if assets:
        _offline_docs(app, assets)
    app.state.inspector = inspector

    def error(status: int, code: str, detail: str) -> JSONResponse:
        return JSONResponse({"error": code, "detail": detail}, status_code=status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(page_html())

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and what is loaded."""
        m, t = inspector.model, inspector.thresholds
        return {"status": "ok", "image_size": m.config.image_size, "image_threshold": t.image,
                "map_threshold": t.map, "map_background": t.background, "detector": m.detector is not None,
                "device": str(m.device), "limits": asdict(settings) | {"max_bytes": settings.max_bytes}}

    @app.post("/predict", responses={400: {"description": "empty, damaged or truncated image"},
                                     413: {"description": "upload or pixel count over the limit"},
                                     415: {"description": "not an image of a supported type"},
                                     422: {"description": "multipart form without a 'file' field"}})
    async def predict(request: Request,
                      overlay: bool = Query(False, description="add the overlay PNG (base64) to the answer"),
                      pictures: bool = Query(False, description="add overlay, heat map and map PNGs (base64)")):
        """Score one image. Send it as multipart field ``file`` or as the raw request body.

        Answers score, verdict (defect/normal), image and map thresholds and map size; PNG pictures on request.
        """
        try:
            data, name = await upload_from(request, settings)
            return await run_in_threadpool(inspector.predict, data, name, overlay, pictures)
        except UploadError as e:
            return error(e.status, e.code, e.detail)

    return app


def serve(model: AnoSegModel | str | Path, settings: ServeSettings, log_level: str = "info",
          model_name: str | None = None) -> None:
    """Run the server until Ctrl-C."""
    try:
        import uvicorn
    except ImportError:
        raise AnosegError("the server needs uvicorn: pip install 'anoseg[deploy]'") from None
    app = create_app(model, settings)
    sock = listening_socket(settings.host, settings.port)  # bound before anything is announced
    port = sock.getsockname()[1]
    print(f"anoseg: serving {model_name or model} on http://{settings.host}:{port}/ (API docs at /docs)")
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port; a taken port or an address that cannot be bound is one clear error."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise AnosegError(f"cannot serve on {host}:{port} ({e.strerror or e})") from None
    return sock
