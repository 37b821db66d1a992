"""A bundle served over HTTP: one image per request in, its embedding or top-k labels out.

    POST /v1/infer   body: the image's bytes (``image/*`` or ``application/octet-stream``), or JSON
                     ``{"image": "<base64>", "top_k": 5, "output": "labels"}``; query ``?top_k=&output=``
    GET  /health     {"status": "ok"}
    GET  /v1/model   what the bundle is (manifest summary), the limits, and the batches formed so far

Concurrent requests are batched up to the profile's batch (:mod:`.batcher`); a full queue answers 503.
A bad request gets a 4xx and one line of JSON, ``{"error": "..."}``: 400 bad JSON, parameter or a
corrupt image, 413 a body or image over the limits, 415 a content type or image format this server
does not take. Nothing a client sends stops the server.

The HTTP layer is starlette on uvicorn, imported only when serving starts (``pip install starlette
uvicorn``); the rest of this module needs only the standard library, numpy and Pillow.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .batcher import BatchResult, MicroBatcher, QueueFull
from .errors import InputError
from .labels import top_labels
from .preprocess import NOT_STILL_IMAGES, UNREADABLE_IMAGE, preprocess

INSTALL = "pip install starlette uvicorn"
OUTPUT_KINDS = ("labels", "embedding")
JSON_KEYS = {"image", "top_k", "output"}


class RequestError(InputError):
    """A request the server refuses; ``status`` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may send.

    Attributes:
        max_body_bytes: the largest request body.
        max_pixels: the largest image, width x height, checked from its header before decoding.
    """

    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class Params:
    """What a request asks for: ``output`` (labels of a classifier, or the embedding) and ``top_k``."""

    output: str
    top_k: int


# ----------------------------------------------------------------------------------- requests


def _params(raw: Mapping[str, object], classifier: bool) -> Params:
    unknown = sorted(set(raw) - {"top_k", "output"})
    if unknown:
        raise RequestError(400, f"unknown parameter {unknown[0]!r} (known: output, top_k)")
    output = raw.get("output", "labels" if classifier else "embedding")
    if output not in OUTPUT_KINDS:
        raise RequestError(400, f"output must be one of {', '.join(OUTPUT_KINDS)} (got {output!r})")
    if output == "labels" and not classifier:
        raise RequestError(400, "output 'labels': this model is not a classifier (its bundle has no labels)")
    top_k = raw.get("top_k", 5)
    try:
        top_k = int(top_k) if not isinstance(top_k, (bool, float)) else None
    except (TypeError, ValueError):
        top_k = None
    if top_k is None or top_k < 1:
        raise RequestError(400, f"top_k must be an integer >= 1 (got {raw.get('top_k')!r})")
    return Params(str(output), top_k)


def parse_request(content_type: str | None, body: bytes, query: Mapping[str, str],
                  classifier: bool) -> tuple[bytes, Params]:
    """The image bytes and parameters of a POST /v1/infer request.

    Raises:
        RequestError: 415 for a content type other than ``image/*``, ``application/octet-stream``
            or ``application/json``; 400 for an empty body, bad JSON or a bad parameter.
    """
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"body is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
            raise RequestError(400, 'a JSON body is an object {"image": "<base64 of the image file>", ...}')
        if set(doc) - JSON_KEYS:
            raise RequestError(400, f"unknown key {sorted(set(doc) - JSON_KEYS)[0]!r} (known: image, output, top_k)")
        try:
            image = base64.b64decode(doc["image"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"image is not valid base64: {e}") from None
        if query:
            raise RequestError(400, "give parameters in the JSON body or the query, not both")
        raw: Mapping[str, object] = {k: v for k, v in doc.items() if k != "image"}
    elif kind.startswith("image/") or kind == "application/octet-stream":
        image, raw = body, dict(query)
    else:
        raise RequestError(415, f"content type {kind or '(none)'!r}: send the image file's bytes as image/* or "
                                "application/octet-stream, or JSON {\"image\": \"<base64>\"}")
    if not image:
        raise RequestError(400, "empty image: the body holds no bytes")
    return image, _params(raw, classifier)


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """The RGB image in ``data``, its size checked from the header before any pixel is decoded.

    Raises:
        RequestError: 415 not a still image Pillow reads; 413 over ``limits.max_pixels``; 400 corrupt
            or truncated.
    """
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise RequestError(415, "not an image format this server reads (JPEG, PNG, WebP, BMP, TIFF, ...)") from None
    except UNREADABLE_IMAGE as e:
        raise RequestError(400, f"image could not be decoded: {_line(e)}") from None
    if im.format in NOT_STILL_IMAGES or isinstance(im, ImageFile.StubImageFile):
        raise RequestError(415, f"image format {im.format} is not a still image this server decodes")
    w, h = im.size
    if w * h > limits.max_pixels:
        raise RequestError(413, f"image of {w}x{h} pixels is over the limit of {limits.max_pixels} pixels")
    try:
        return im.convert("RGB")
    except UNREADABLE_IMAGE as e:
        raise RequestError(400, f"image could not be decoded: {_line(e)}") from None


def _line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# ------------------------------------------------------------------------------------ the model


class ServedModel:
    """A bundle's model behind a :class:`MicroBatcher`: images in, JSON answers out.

    Args:
        manifest: the bundle's manifest.json (preprocessing, labels, profile, ...).
        outputs: the graph outputs the run function returns, in order: ``embedding`` first, then
            ``logits`` for a classifier (names as in the graph, e.g. ``embedding_4``).
        batcher: runs the batches.
        limits: what one request may send.
        providers: the execution providers the session runs on, for /v1/model.
    """

    def __init__(self, manifest: dict, outputs: Sequence[str], batcher: MicroBatcher, limits: Limits,
                 providers: Sequence[str] = ()):
        self.manifest, self.outputs, self.batcher, self.limits = manifest, list(outputs), batcher, limits
        self.providers = list(providers)
        self.labels = list(manifest.get("labels") or [])
        self.classifier = bool(self.labels) and len(self.outputs) > 1
        pre = manifest["preprocessing"]
        self._pre = (int(pre["img_size"]), pre["mean"], pre["std"])

    def prepare(self, content_type: str | None, body: bytes, query: Mapping[str, str]) -> tuple[np.ndarray, Params]:
        """A request's pixels [3, S, S] (decoded and preprocessed as the bundle's infer.py does) and parameters."""
        data, params = parse_request(content_type, body, query, self.classifier)
        return preprocess(decode_image(data, self.limits), *self._pre), params

    def answer(self, result: BatchResult, params: Params) -> dict:
        """The JSON answer: top-k labels with probabilities, or the embedding; and the batch it ran in."""
        if params.output == "labels":
            row = top_labels(result.outputs[1][None], self.labels, params.top_k)[0]
            return {"labels": [{"label": name, "probability": p} for name, p in row], "batch": result.batch}
        emb = result.outputs[0].astype(np.float32)
        return {"embedding": emb.tolist(), "dim": int(emb.shape[-1]), "batch": result.batch}

    def summary(self) -> dict:
        """GET /v1/model: the bundle, its answers, the limits, and the batching so far."""
        m = self.manifest
        return {"profile": m.get("profile"), "depth": m.get("depth"), "precision": m.get("precision"),
                "kind": "classifier" if self.classifier else "embedding", "labels": self.labels or None,
                "outputs": self.outputs, "preprocessing": m.get("preprocessing"), "providers": self.providers,
                "limits": {"max_body_bytes": self.limits.max_body_bytes, "max_pixels": self.limits.max_pixels},
                "batching": self.batcher.stats()}


# ------------------------------------------------------------------------------------- the app


def require_framework() -> None:
    """Raises InputError naming the pip command when starlette or uvicorn cannot be imported."""
    missing = []
    for name in ("starlette", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise InputError(f"serving needs {' and '.join(missing)}, not installed here: {INSTALL}")


def build_app(model: ServedModel):
    """The starlette application of ``model``'s three endpoints."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def refuse(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def read_body(request: Request) -> bytes:
        limit = model.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise RequestError(413 if declared.isdigit() else 400,
                               f"body of {declared} bytes is over the limit of {limit} bytes" if declared.isdigit()
                               else f"bad Content-Length {declared!r}")
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body has no length: count as it comes
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"body over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def infer(request: Request) -> JSONResponse:
        try:
            body = await read_body(request)
            pixels, params = await run_in_threadpool(model.prepare, request.headers.get("content-type"), body,
                                                     dict(request.query_params))
            result = await asyncio.wrap_future(model.batcher.submit(pixels))
        except RequestError as e:
            return refuse(e.status, str(e))
        except QueueFull as e:
            return JSONResponse({"error": str(e)}, status_code=503, headers={"Retry-After": "1"})
        except ClientDisconnect:
            return refuse(400, "client disconnected before sending the whole body")
        except Exception as e:  # noqa: BLE001 - a failed batch answers 500 and the server goes on
            return refuse(500, f"inference failed: {type(e).__name__}: {_line(e)}")
        return JSONResponse(model.answer(result, params))

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def describe(request: Request) -> JSONResponse:
        return JSONResponse(model.summary())

    async def not_found(request: Request, exc) -> JSONResponse:
        status = getattr(exc, "status_code", 404)
        return refuse(status, f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')} "
                              "(endpoints: POST /v1/infer, GET /health, GET /v1/model)")

    routes = [Route("/v1/infer", infer, methods=["POST"]), Route("/health", health, methods=["GET"]),
              Route("/v1/model", describe, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one, chosen by the system).

    The socket says it is TCP (its protocol, not 0) so that asyncio sets TCP_NODELAY on every
    connection: without it, Nagle's algorithm holds the body of a keep-alive answer until the
    client's delayed ACK, 40 ms a request.

    Raises:
        InputError: the address cannot be bound (in use, not this machine's).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             proto=socket.IPPROTO_TCP)[0]
        sock = socket.socket(family, kind, proto)
        try:
            if hasattr(socket, "SO_REUSEADDR") and sys.platform != "win32":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as e:
        raise InputError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}") from None


def serve(model: ServedModel, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serves ``model`` until interrupted (SIGINT / SIGTERM): uvicorn finishes the requests in flight
    (10 s at most), then re-raises the signal, so the process ends as its parent asked.

    Prints ``serving: http://HOST:PORT`` (the port bound, when 0 was asked) once it listens.
    """
    require_framework()
    import uvicorn

    sock = bind(host, port)
    bound = sock.getsockname()[1]
    # Connections beyond what the queue, the running batch and the decoding threads hold are
    # refused by uvicorn itself (503), so waiting requests cannot pile up in memory either.
    limit = model.batcher.queue_size + model.batcher.batch + 64
    config = uvicorn.Config(build_app(model), log_level=log_level, limit_concurrency=limit, access_log=False,
                            timeout_graceful_shutdown=10)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving: http://{shown}:{bound} (POST /v1/infer, GET /health, GET /v1/model); batch <= "
          f"{model.batcher.batch}, wait <= {model.batcher.max_wait_s * 1e3:g} ms, queue {model.batcher.queue_size}",
          flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        model.batcher.close()
        sock.close()
