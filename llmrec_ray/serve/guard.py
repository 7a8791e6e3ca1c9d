"""What stands in front of the routes: the raw-body guard (ASGI middleware) and the app's error answers.

Every error is {"error": "..."}: `RequestGuard` answers 413 (body over serve.max_body_bytes) and 400 (JSON nested
deeper than serve.max_json_depth) on the raw bytes before FastAPI parses anything, and 500 (without a traceback)
for a bug in a route; `install_error_handlers` turns FastAPI's HTTPException (401, 422, 503, 504 raised by the
routes; 404, 405) and its request validation errors (422 naming the field) into the same shape.
"""

import logging
from typing import Any, Callable, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmrec_ray.config import ServeConfig
from llmrec_ray.serve.schemas import UNION_TAGS

log = logging.getLogger("llmrec.serve")


def error_response(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


def json_depth(body: bytes) -> int:
    """The deepest nesting of [ and { outside JSON strings, in a few vectorised passes over the raw bytes
    (the parser recurses once per level: this runs before it). Garbage in, a number out; the parser rejects it."""
    b = np.frombuffer(body, np.uint8)
    if not len(b):
        return 0
    idx = np.arange(len(b), dtype=np.int64)
    backslash = b == 0x5C
    run = idx - np.maximum.accumulate(np.where(backslash, -1, idx))  # backslashes ending at i (0 if b[i] is not one)
    escaped = np.concatenate(([False], run[:-1] % 2 == 1))  # an odd run of backslashes before it escapes a quote
    quote = (b == 0x22) & ~escaped
    inside = np.cumsum(quote) % 2 == 1  # from an opening quote up to (not including) its closing one
    step = (((b == 0x5B) | (b == 0x7B)) & ~inside).astype(np.int64) - (((b == 0x5D) | (b == 0x7D)) & ~inside)
    return int(np.cumsum(step).max(initial=0))


async def _read_body(scope, receive, limit: int) -> tuple[Optional[bytes], Optional[int]]:
    """(body, None); (None, size) when over `limit` (read no further); (None, None) when the client went away."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return None, int(value)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None, size
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()  # after the body: wait for the disconnect as usual
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replayed


def _refusal(body: Optional[bytes], size: Optional[int], s: ServeConfig) -> Optional[JSONResponse]:
    """The answer to a body over the limits, before it is parsed; None: let it through."""
    if size is not None:
        return error_response(413, f"request body is {size} bytes or more; serve.max_body_bytes={s.max_body_bytes}")
    if body.count(b"[") + body.count(b"{") > s.max_json_depth and json_depth(body) > s.max_json_depth:
        return error_response(400, f"request body nests JSON deeper than serve.max_json_depth={s.max_json_depth}")
    return None


class RequestGuard:
    """Plain ASGI middleware: refuses an oversized (413) or too deeply nested (400) body on its raw bytes, before
    FastAPI parses it, then replays the body; answers a route's unexpected exception 500 without a traceback; tells
    the replica every answer's path and status (for /metrics).

    `replica()` gives the ingress object of this replica (`.cfg.serve` for the limits, `.metrics.count(path,
    status)`), or None outside a replica (an offline TestClient: default limits, nothing counted)."""

    def __init__(self, app, replica: Callable[[], Any]):
        self.app, self.replica = app, replica

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = self.replica()
        s = api.cfg.serve if api is not None else ServeConfig()
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        status: list[Optional[int]] = [None]  # until a response starts

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body, size = await _read_body(scope, receive, s.max_body_bytes)
                if body is None and size is None:
                    return  # the client went away
                refusal = _refusal(body, size, s)
                if refusal is not None:
                    return await refusal(scope, receive, counted)
                receive = _replay(body, receive)
            await self.app(scope, receive, counted)
        except Exception as exc:  # a bug in a route: the client gets a 500 naming the exception type, the log the rest
            log.exception("llmrec serve: internal error")
            if status[0] is None:  # nothing sent yet
                await error_response(500, f"internal error: {type(exc).__name__}")(scope, receive, counted)
        finally:
            if api is not None:
                api.metrics.count(path, status[0] or 500)


# --- error answers of the app ---------------------------------------------------------------------------------
def _where(loc) -> str:
    """('body', 'candidates', 2, 'object', 'text') -> 'candidates[2].text'."""
    out = ""
    for i, part in enumerate(loc):
        if (i == 0 and part == "body") or part in UNION_TAGS:
            continue
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "body"


def explain(errors) -> str:
    """pydantic's validation errors (at most 5) as one line naming each field: 'candidates[2].text: ...'."""
    problems = []
    for e in list(errors)[:5]:
        if e.get("type") == "json_invalid":
            problems.append(f"body is not valid JSON: {(e.get('ctx') or {}).get('error', '')}")
        else:
            problems.append(f"{_where(e.get('loc', ()))}: {e.get('msg')}")
    return "; ".join(problems)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "invalid request: " + explain(exc.errors()))


def install(app: FastAPI, replica: Callable[[], Any]) -> None:
    """The guard and both error handlers on `app`."""
    app.add_middleware(RequestGuard, replica=replica)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
