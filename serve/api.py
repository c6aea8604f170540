"""The HTTP API and the page, as a FastAPI app over a model backend.

The app knows nothing about Ray: it talks to a :class:`Backend` (in Serve, a
deployment handle to the model replicas). Everything a client sends is
bounded before it costs anything: the API key is checked first, a declared
body over the limit is refused from its Content-Length, an undeclared one
while it streams in, the content type is checked before the body is read,
and images are checked from their header before they are decoded
(``serve.images``). Every refusal is a 4xx with ``{"error": {"code",
"message"}}``.

What one request may cost is bounded: header count and size (431), the body
(413), the time to send it (``serve.body_timeout_s``, 408), the request's
deadline (``serve.request_timeout_s``), JSON structure (counted before
parsing, nesting depth caught), text (only valid Unicode scalar values),
bodies held at once (``serve.body_memory_bytes``, 429) and decodes running at
once (``serve.decode_memory_bytes``, requests wait their turn). The Ray Serve
proxy in front reads headers and bodies before the app sees them; what it
does not bound is listed in the README's serving section.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from serve import render
from serve.errors import STATUS_CODES, ApiError, error_body
from serve.images import center_view, decode_image, fit_short_side, inspect_image, plain_words
from serve.schemas import (
    ClassifyBody,
    ConceptPage,
    ErrorAnswer,
    ExplainAnswer,
    ExplainBody,
    HealthAnswer,
    SegmentBody,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
OPEN_PATHS = frozenset({"/healthz"})
DOCS_ASSETS = "/docs-assets"  # Swagger UI's script and style, from the fastapi-offline package
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
PUBLIC_LIMITS = ("max_body_bytes", "max_pixels", "max_aspect", "max_jpeg_scans", "max_classes", "max_class_chars",
                 "max_top_k", "max_batch_size", "body_timeout_s", "request_timeout_s", "max_headers", "max_header_bytes")
DEFAULT_TOP_K = 8
DEFAULT_SEGMENT_TOP_K = 5
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff")
ACCEPTED = "multipart/form-data (field 'image'), application/json ({\"image_b64\": ...}), " + ", ".join(
    IMAGE_TYPES) + " or application/octet-stream (the raw image)"


class Backend(Protocol):
    """What the API needs from the model (a Serve handle in production, anything in tests)."""

    async def explain(self, view: Any, top_k: int) -> Any: ...
    async def segment(self, image: Any, classes: list[str], top_k: int) -> dict[str, Any]: ...
    async def classify(self, view: Any, classes: list[str] | None, top_k: int) -> dict[str, Any]: ...
    async def concepts_page(self, q: str | None, level: int | None, offset: int, limit: int) -> dict[str, Any]: ...
    async def concept_detail(self, concept_id: int) -> dict[str, Any] | None: ...
    async def ping(self) -> bool: ...


# ------------------------------------------------------------------ guards


class Budget:
    """Bytes a replica may hold at once for one purpose (bodies, decodes); asyncio, one event loop.

    ``take`` admits a request when it fits, or when nothing else holds any (so one item larger
    than the whole budget still runs, alone); ``try_take`` never waits.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._freed = asyncio.Condition()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.capacity

    def try_take(self, n: int) -> bool:
        if not self._fits(n):
            return False
        self.used += n
        return True

    async def take(self, n: int) -> None:
        async with self._freed:
            await self._freed.wait_for(lambda: self._fits(n))
            self.used += n

    async def give(self, n: int) -> None:
        async with self._freed:
            self.used -= n
            self._freed.notify_all()


class Guard:
    """ASGI middleware, before any routing or reading: header limits, the API key, the declared body
    size, the bodies held at once, and the request's deadline.

    The key comes as ``X-API-Key`` or as the password of HTTP Basic auth, so a
    browser can open the page (it asks once and then sends the credentials on
    the page's own requests). Compared in constant time.
    """

    def __init__(self, app: Any, api_key: str | None, limits: Any, bodies: Budget) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = limits.max_body_bytes
        self.max_headers = limits.max_headers
        self.max_header_bytes = limits.max_header_bytes
        self.deadline = limits.request_timeout_s
        self.bodies = bodies

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key")
        if given is not None and hmac.compare_digest(given, self.key):
            return True
        auth = headers.get(b"authorization", b"")
        if auth[:6].lower() == b"basic ":
            try:
                _, _, password = base64.b64decode(auth[6:].strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(password, self.key)
        return False

    @staticmethod
    async def _refuse(scope: dict, receive: Any, send: Any, status: int, code: str, message: str,
                      headers: dict[str, str] | None = None) -> None:
        await JSONResponse(error_body(code, message), status_code=status, headers=headers)(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = scope.get("headers", [])
        size = sum(len(k) + len(v) + 4 for k, v in raw)
        if len(raw) > self.max_headers or size > self.max_header_bytes:
            return await self._refuse(scope, receive, send, 431, "headers_too_large",
                                      f"{len(raw)} header lines, {size:,} bytes; the limits are {self.max_headers} "
                                      f"lines (serve.max_headers) and {self.max_header_bytes:,} bytes "
                                      "(serve.max_header_bytes)", {"Connection": "close"})
        headers = {k.lower(): v for k, v in raw}
        if self.key is not None and scope.get("path") not in OPEN_PATHS and not self._authorised(headers):
            return await self._refuse(scope, receive, send, 401, "unauthorized",
                                      "missing or wrong API key: send it in the X-API-Key header",
                                      {"WWW-Authenticate": 'Basic realm="insight"'})
        declared = 0
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0 or len(length) > 19:
                return await self._refuse(scope, receive, send, 400, "bad_request",
                                          f"invalid Content-Length {length[:40]!r}")
            if declared > self.max_body:
                return await self._refuse(
                    scope, receive, send, 413, "body_too_large",
                    f"the body is {declared:,} bytes; the limit is {self.max_body:,} (serve.max_body_bytes)",
                    {"Connection": "close"})
        if declared and not self.bodies.try_take(declared):
            return await self._refuse(scope, receive, send, 429, "too_many_requests",
                                      "the server holds as many request bodies as it may "
                                      "(serve.body_memory_bytes); retry shortly", {"Retry-After": "1"})
        held = declared
        started = body_done = False

        async def counted_receive() -> dict:
            nonlocal held
            nonlocal body_done
            message = await receive()
            if message.get("type") == "http.request":
                body_done = not message.get("more_body", False)
                extra = len(message.get("body", b""))
                got = counted[0] + extra
                counted[0] = got
                if got > held:  # an undeclared (chunked) body: hold its bytes as they come
                    if not self.bodies.try_take(got - held):
                        raise ApiError(429, "too_many_requests", "the server holds as many request bodies as it "
                                       "may (serve.body_memory_bytes); retry shortly", {"Retry-After": "1"})
                    held = got
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        counted = [0]
        scope.setdefault("state", {})["t_arrived"] = time.perf_counter()  # Server-Timing's "app" starts here
        try:
            async with asyncio.timeout(self.deadline):
                await self.app(scope, counted_receive, tracked_send)
        except TimeoutError:
            if not started:
                status, code = (503, "deadline_exceeded") if body_done else (408, "request_timeout")
                await self._refuse(scope, receive, send, status, code,
                                   f"the request did not finish within {self.deadline:g} s (serve.request_timeout_s)",
                                   {"Connection": "close"})
        finally:
            if held:
                await self.bodies.give(held)


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The whole body, refused as soon as it passes ``limit`` (chunked uploads have no length)
    or when it takes longer than ``timeout_s`` to arrive (a client that sends slowly, or stops)."""
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    raise ApiError(413, "body_too_large",
                                   f"the body passed {limit:,} bytes while streaming in; the limit is {limit:,}"
                                   " (serve.max_body_bytes)", headers={"Connection": "close"})
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the body did not arrive within {timeout_s:g} s "
                       f"({len(buf):,} bytes came; serve.body_timeout_s)", headers={"Connection": "close"}) from None
    return bytes(buf)


def json_items_limit(limits: Any) -> int:
    """Most ``,`` ``[`` ``{`` a valid JSON request can hold: every class name could be full of commas."""
    return 64 + limits.max_classes * (limits.max_class_chars + 2)


def parse_json(data: bytes | str, limits: Any, what: str = "the body") -> Any:
    """JSON from untrusted bytes: UTF-8 only, its structure counted before it is parsed (a 2 MB body of
    a million empty lists would cost hundreds of MB as Python objects), nesting depth caught."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, "invalid_text", f"{what} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    items = data.count(",") + data.count("[") + data.count("{")
    cap = json_items_limit(limits)
    if items > cap:
        raise ApiError(400, "json_too_complex", f"{what} holds {items:,} JSON commas, arrays and objects; a valid "
                       f"request needs at most {cap:,} (from serve.max_classes and serve.max_class_chars)")
    try:
        return json.loads(data)
    except RecursionError:
        raise ApiError(400, "json_too_deep", f"{what} is JSON nested too deeply to be a valid request") from None
    except ValueError as exc:
        raise ApiError(400, "malformed_json", f"{what} is not valid JSON: {exc}"[:300]) from None


def check_text(text: str, what: str) -> str:
    """Only Unicode scalar values: a lone surrogate (``\\ud800``) cannot be encoded in any answer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, "invalid_text", f"{what} is not valid Unicode text: it holds the lone surrogate "
                       f"U+{ord(text[exc.start]):04X} at character {exc.start}") from None
    return text


def _precheck(data: dict[str, Any], model: type[BaseModel], limits: Any) -> None:
    """Cheap checks before pydantic builds anything: field names, and the count of class names."""
    unknown = [k for k in data if k not in model.model_fields]
    if unknown:
        shown = ", ".join(ascii(k)[:60] for k in unknown[:5])
        raise ApiError(422, "invalid_request", f"unknown field(s) {shown}; allowed: {', '.join(model.model_fields)}")
    classes = data.get("classes")
    if isinstance(classes, list) and len(classes) > limits.max_classes:
        raise ApiError(400, "too_many_classes",
                       f"{len(classes):,} class names; the limit is {limits.max_classes} (serve.max_classes)")


def _b64(text: str) -> bytes:
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise ApiError(400, "invalid_base64", "image_b64 is a data: URL without ';base64,' data")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "invalid_base64", f"image_b64 is not valid base64: {exc}") from None


def _validation_message(exc: ValidationError | RequestValidationError, prefix: str = "") -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{prefix}{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts)[:500] or "invalid request"


class StrictMultiPartParser(MultiPartParser):
    """Starlette's parser, except that a text field that is not UTF-8 is refused: Starlette would decode
    it as Latin-1 and hand on mojibake (the raw bytes of a lone surrogate become 'í\\xa0\\x80')."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ApiError(400, "invalid_text", f"the multipart field {ascii(part.field_name)[:60]} is not "
                               f"UTF-8 text (invalid byte at offset {exc.start})") from None
        super().on_part_end()


def _classes_field(value: str, limits: Any) -> list[str]:
    """A multipart ``classes`` field: a JSON list, or names separated by commas or new lines."""
    value = value.strip()
    if value.startswith("["):
        parsed = parse_json(value, limits, "the 'classes' field")
        if not isinstance(parsed, list) or not all(isinstance(c, str) for c in parsed):
            raise ApiError(422, "invalid_request", "the 'classes' field must be a JSON list of strings")
        names = parsed
    else:
        names = value.split("\n" if "\n" in value else ",")
    if len(names) > limits.max_classes:
        raise ApiError(400, "too_many_classes",
                       f"{len(names):,} class names; the limit is {limits.max_classes} (serve.max_classes)")
    return names


async def parse_image_request(request: Request, model: type[BaseModel], limits: Any) -> tuple[bytes, dict[str, Any]]:
    """(image bytes, the other validated fields) from multipart, JSON or a raw image body."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    raw_ok = media in IMAGE_TYPES or media == "application/octet-stream"
    if media not in ("application/json", "multipart/form-data") and not raw_ok:
        shown = repr(ctype[:80]) if ctype else "none"
        raise ApiError(415, "unsupported_media_type", f"Content-Type {shown} is not accepted; send {ACCEPTED}")
    body = await read_body(request, limits.max_body_bytes, limits.body_timeout_s)
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty; it must carry an image")
    fields: dict[str, Any]
    if media == "application/json":
        data = parse_json(body, limits)
        del body
        if not isinstance(data, dict):
            raise ApiError(422, "invalid_request", f"the JSON body must be an object, not {type(data).__name__}")
        _precheck(data, model, limits)
        try:
            parsed = model.model_validate(data)
        except ValidationError as exc:
            raise ApiError(422, "invalid_request", _validation_message(exc)) from None
        fields = parsed.model_dump(exclude={"image_b64"}, exclude_none=True)
        return _b64(parsed.image_b64), fields
    if media == "multipart/form-data":
        async def once():
            yield body

        parser = StrictMultiPartParser(request.headers, once(), max_files=1, max_fields=16, max_part_size=64 * 1024)
        try:
            form = await parser.parse()
        except ApiError:
            raise
        except MultiPartException as exc:
            raise ApiError(400, "malformed_multipart", f"the multipart body cannot be parsed: {exc.message}") from None
        except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes is the body's fault
            raise ApiError(400, "malformed_multipart", f"the multipart body cannot be parsed: {plain_words(exc)}") from None
        try:
            image = form.get("image")
            if image is None:
                names = ", ".join(ascii(k)[:40] for k in sorted(set(form.keys()))) or "none"
                raise ApiError(400, "missing_image", f"the multipart body has no 'image' file field (fields: {names})")
            if not isinstance(image, UploadFile):
                raise ApiError(400, "missing_image", "the multipart field 'image' must be a file upload, not text")
            data = await image.read()
            allowed = set(model.model_fields) - {"image_b64"}
            fields = {}
            for key, value in form.multi_items():
                if key == "image":
                    continue
                if key not in allowed:
                    raise ApiError(422, "invalid_request", f"unknown multipart field {ascii(key)[:60]}; "
                                   f"allowed: image, {', '.join(sorted(allowed))}")
                if not isinstance(value, str):
                    raise ApiError(422, "invalid_request", f"the multipart field {key!r} must be text, not a file")
                fields[key] = _classes_field(value, limits) if key == "classes" else value
            try:
                parsed = model.model_validate({"image_b64": "", **fields})
            except ValidationError as exc:
                raise ApiError(422, "invalid_request", _validation_message(exc)) from None
            return data, parsed.model_dump(exclude={"image_b64"}, exclude_none=True)
        finally:
            await form.close()
    return body, {}


def _fidelity(raw: Any, info: dict[str, Any]) -> dict[str, float]:
    """How well the concepts reconstruct this view (cosine, FVU, L0) and, from the model's training run,
    the images held out from training (``val_*``): a low figure on both says the model, not the photo."""
    out = {"cosine": round(raw.cosine, 6), "fvu": round(raw.fvu, 6), "l0": round(raw.l0, 3)}
    metrics = info.get("metrics") or {}
    out.update({key: round(float(metrics[key]), 6) for key in ("val_cosine", "val_fvu") if key in metrics})
    return {k: v for k, v in out.items() if math.isfinite(v)}


def check_top_k(value: int | None, default: int, limit: int) -> int:
    k = default if value is None else value
    if not 1 <= k <= limit:
        raise ApiError(422, "invalid_request", f"top_k={k} is out of range; allowed 1..{limit} (serve.max_top_k)")
    return k


def check_classes(classes: list[str] | None, max_classes: int, max_chars: int) -> list[str]:
    if classes is None or len(classes) == 0:
        raise ApiError(400, "no_classes", "give at least one class name ('classes')")
    if len(classes) > max_classes:
        raise ApiError(400, "too_many_classes",
                       f"{len(classes)} class names; the limit is {max_classes} (serve.max_classes)")
    out = []
    for i, c in enumerate(classes):
        name = " ".join(check_text(str(c), f"class name {i}").split())
        if not name:
            raise ApiError(400, "empty_class_name", f"class name {i} is empty")
        if len(name) > max_chars:
            raise ApiError(400, "class_name_too_long",
                           f"class name {i} has {len(name)} characters; the limit is {max_chars} (serve.max_class_chars)")
        out.append(name)
    seen: set[str] = set()
    for name in out:
        if name.lower() in seen:
            raise ApiError(400, "duplicate_class", f"class name {ascii(name)[:80]} is given twice")
        seen.add(name.lower())
    return out


# ------------------------------------------------------------------ the app


def build_api(backend: Backend, limits: Any, info: dict[str, Any]) -> FastAPI:
    """The FastAPI app: ``limits`` is the ServeConfig, ``info`` the model's description."""
    from fastapi_offline import FastAPIOffline

    app = FastAPIOffline(
        title="Insight",
        version="1",
        description="Concept explanations, segmentation and classification through a hierarchical SAE on CLIP "
        "patch features. Errors are `{\"error\": {\"code\", \"message\"}}`; with serve.api_key set, every route "
        "but /healthz needs the `X-API-Key` header (or HTTP Basic auth with the key as password).",
        docs_url="/docs", redoc_url=None, openapi_url="/openapi.json", static_url=DOCS_ASSETS,
        responses={400: {"model": ErrorAnswer}, 401: {"model": ErrorAnswer}, 413: {"model": ErrorAnswer},
                   415: {"model": ErrorAnswer}, 422: {"model": ErrorAnswer}},
    )
    bodies, decodes = Budget(limits.body_memory_bytes), Budget(limits.decode_memory_bytes)
    app.add_middleware(Guard, api_key=limits.api_key, limits=limits, bodies=bodies)
    model_ref = {k: info.get(k) for k in ("name", "version", "run_id", "uri")}
    image_size = int(info["image_size"])
    n_concepts = int(info["n_concepts"])

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", _validation_message(exc)), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal", f"internal error: {type(exc).__name__}"), status_code=500)

    @contextlib.asynccontextmanager
    async def decoded(data: bytes, min_side: int):
        """Decode within the replica's decode-memory budget (checked from the header first); the
        budget is held until the caller has cut the view it needs and dropped the full image."""
        head = inspect_image(data, limits.max_pixels, limits.max_aspect, limits.max_jpeg_scans)
        await decodes.take(head.decode_bytes)
        try:
            yield await asyncio.to_thread(decode_image, data, limits.max_pixels, min_side,
                                          max_aspect=limits.max_aspect, max_jpeg_scans=limits.max_jpeg_scans)
        finally:
            await decodes.give(head.decode_bytes)

    def decode_view(data: bytes) -> tuple[dict[str, Any], Any]:
        img = decode_image(data, limits.max_pixels, image_size, max_aspect=limits.max_aspect,
                           max_jpeg_scans=limits.max_jpeg_scans)
        return {"width": img.width, "height": img.height, "format": img.format}, center_view(img, image_size)

    async def view_of(data: bytes) -> tuple[dict[str, Any], Any]:
        """(the upload's width/height/format, the model's view) with the decode's memory released.

        Decode and view in one worker-thread call: each hand-off to a thread and back costs a
        wake-up, which on a busy machine is milliseconds."""
        head = inspect_image(data, limits.max_pixels, limits.max_aspect, limits.max_jpeg_scans)
        await decodes.take(head.decode_bytes)
        try:
            return await asyncio.to_thread(decode_view, data)
        finally:
            await decodes.give(head.decode_bytes)

    # -------------------------------------------------------------- routes

    @app.get("/healthz", response_model=HealthAnswer, tags=["meta"])
    async def healthz() -> JSONResponse:
        """Liveness: the HTTP side answers (Serve only routes here once the model replicas are up).

        Open even when an API key is set, so it says nothing else; it never waits on the model,
        so it answers while the model is saturated.
        """
        return JSONResponse({"status": "ok"})

    @app.get("/v1/model", tags=["meta"])
    async def model_info() -> dict[str, Any]:
        """Model version, run, config, metrics, and the shape of its concept dictionary."""
        return {**info, "limits": {k: getattr(limits, k) for k in PUBLIC_LIMITS}}

    @app.post("/v1/explain", response_model=ExplainAnswer, tags=["explain"], openapi_extra=_image_body(ExplainBody))
    async def explain(request: Request, top_k: int | None = Query(None, description="Concepts to list (default 8)."),
                      format: str | None = Query(None, pattern="^(packed|png|raw)$",
                                                 description="Heatmaps as one packed uint8 array (default), "
                                                 "a PNG per concept, or raw arrays."),
                      ) -> JSONResponse:
        """The image's top concepts: names, scores, level, hierarchy path and a heatmap each.

        The answer's ``Server-Timing`` header says where this replica's time went (ms): ``route``
        (the request's arrival in the app to this handler), ``read`` (body, parsing), ``decode``
        (image and view), ``model`` (the call to the model replica: ``replica`` inside it,
        ``compute`` of that the model itself), ``render`` (heatmaps), ``json`` and ``app`` (the
        request's arrival in the app to its encoded answer)."""
        t0 = time.perf_counter()
        data, fields = await parse_image_request(request, ExplainBody, limits)
        k = check_top_k(fields.get("top_k", top_k), DEFAULT_TOP_K, limits.max_top_k)
        fmt = fields.get("format", format) or "packed"
        t_read = time.perf_counter()
        meta, view = await view_of(data)
        del data
        t1 = time.perf_counter()
        raw = await backend.explain(view.pixels, k)
        t2 = time.perf_counter()
        answer = {
            "model": model_ref,
            "image": meta,
            "view": dict(zip(("x", "y", "width", "height"), (round(v, 2) for v in view.box), strict=True)),
            "grid": list(raw.maps.shape[1:]) if raw.maps.size else info["grid"],
            "format": fmt,
            "concepts": render.explain_answer(raw, fmt),
            "fidelity": _fidelity(raw, info),
        }
        if fmt == "packed":
            answer["heatmaps"] = render.packed_heatmaps(raw.maps)
        t3 = time.perf_counter()
        answer["timing_ms"] = {"decode": round((t1 - t0) * 1e3, 2), "model": round((t2 - t1) * 1e3, 2),
                               "compute": round(raw.compute_ms, 2), "total": round((t3 - t0) * 1e3, 2)}
        response = JSONResponse(answer)
        t4 = time.perf_counter()
        arrived = request.scope.get("state", {}).get("t_arrived", t0)
        stages = {"route": t0 - arrived, "read": t_read - t0, "decode": t1 - t_read, "model": t2 - t1,
                  "replica": raw.replica_ms / 1e3, "compute": raw.compute_ms / 1e3, "render": t3 - t2,
                  "json": t4 - t3, "app": t4 - arrived}
        response.headers["Server-Timing"] = ", ".join(f"{name};dur={sec * 1e3:.2f}" for name, sec in stages.items()
                                                      if math.isfinite(sec))
        return response

    @app.post("/v1/segment", tags=["tasks"], openapi_extra=_image_body(SegmentBody))
    async def segment(request: Request, top_k: int | None = Query(None, description="Concepts per segment."),
                      format: str | None = Query(None, pattern="^(png|raw)$")) -> JSONResponse:
        """Zero-shot segmentation into the given classes, each segment explained by its top concepts."""
        t0 = time.perf_counter()
        data, fields = await parse_image_request(request, SegmentBody, limits)
        classes = check_classes(fields.get("classes"), limits.max_classes, limits.max_class_chars)
        k = check_top_k(fields.get("top_k", top_k), DEFAULT_SEGMENT_TOP_K, limits.max_top_k)
        fmt = fields.get("format", format) or "png"
        short, long = int(info["segment_short_side"]), int(info["segment_max_long_side"])
        async with decoded(data, short) as img:
            meta = {"width": img.width, "height": img.height, "format": img.format}
            pixels = await asyncio.to_thread(fit_short_side, img, short, long)
        del data
        result = await backend.segment(pixels, classes, k)
        labels = result.pop("labels")
        out = {"model": model_ref, "image": meta,
               "size": [int(labels.shape[1]), int(labels.shape[0])], "classes": classes, **result}
        if fmt == "raw":
            out["labels"] = labels.tolist()
        else:
            out["label_map_png"] = render.label_map_png(labels, len(classes), result.get("background_index"))
            out["palette"] = render.palette(len(classes))
        out["timing_ms"] = {"total": round((time.perf_counter() - t0) * 1e3, 2)}
        return JSONResponse(out)

    @app.post("/v1/classify", tags=["tasks"], openapi_extra=_image_body(ClassifyBody))
    async def classify(request: Request, top_k: int | None = Query(None, description="Concepts per class.")
                       ) -> JSONResponse:
        """Class scores (zero-shot with `classes`, else the model's probe), each with its top concepts."""
        t0 = time.perf_counter()
        data, fields = await parse_image_request(request, ClassifyBody, limits)
        classes = fields.get("classes")
        if classes is not None or not info.get("has_probe"):
            if classes is None:
                raise ApiError(400, "no_classes", "this model has no trained probe: give class names ('classes')")
            classes = check_classes(classes, limits.max_classes, limits.max_class_chars)
        k = check_top_k(fields.get("top_k", top_k), DEFAULT_SEGMENT_TOP_K, limits.max_top_k)
        meta, view = await view_of(data)
        del data
        result = await backend.classify(view.pixels, classes, k)
        out = {"model": model_ref, "image": meta,
               **result, "timing_ms": {"total": round((time.perf_counter() - t0) * 1e3, 2)}}
        return JSONResponse(out)

    @app.get("/v1/concepts", response_model=ConceptPage, tags=["concepts"])
    async def concepts(offset: int = Query(0, ge=0, le=10_000_000), limit: int = Query(50, ge=1, le=500),
                       q: str | None = Query(None, max_length=200, description="Substring of the name or the id."),
                       level: int | None = Query(None, ge=0, le=64, description="Only this hierarchy level.")
                       ) -> dict[str, Any]:
        """A page of concepts, searchable by name and filterable by level."""
        return await backend.concepts_page(q, level, offset, limit)

    @app.get("/v1/concepts/{concept_id}", tags=["concepts"])
    async def concept(concept_id: int) -> dict[str, Any]:
        """One concept: names, candidates, parents, children, path from the root, gallery PNG if any."""
        if not 0 <= concept_id < n_concepts:
            raise ApiError(404, "unknown_concept",
                           f"concept {concept_id} does not exist; this model has {n_concepts} (ids 0..{n_concepts - 1})")
        detail = await backend.concept_detail(concept_id)
        if detail is None:
            raise ApiError(404, "unknown_concept", f"concept {concept_id} does not exist")
        return detail

    # -------------------------------------------------------------- the page

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                           "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _image_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of an image endpoint (it reads the body itself, bounded)."""
    schema = model.model_json_schema()
    form_props = {"image": {"type": "string", "format": "binary"}}
    for key, prop in schema.get("properties", {}).items():
        if key != "image_b64":
            form_props[key] = {"type": "string", "description": prop.get("description", "")}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": form_props}},
        "application/json": {"schema": schema},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }}}
