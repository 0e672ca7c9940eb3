"""The control plane's routes read a JSON body that says a key twice as an error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from shared.unique_keys import repeated_json_keys


class UniqueKeysRoute(APIRoute):
    """An APIRoute that refuses (422, naming the key's path) a JSON body saying one key
    twice in an object, which ``json.loads`` reads as the last value with no word said.
    For routes with small JSON bodies: the body is read in full first (FastAPI keeps it)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handle = super().get_route_handler()

        async def refusing_repeated_keys(request: Request) -> Response:
            if _json_body(request):
                _refuse_repeated(await request.body())
            return await handle(request)

        return refusing_repeated_keys


def _json_body(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return request.method in ("POST", "PUT", "PATCH") and (
        kind == "application/json" or kind.endswith("+json")
    )


def _refuse_repeated(body: bytes) -> None:
    errors = [
        {
            "loc": ("body", *path),
            "msg": f"the key {path[-1]!r} a second time in one object: say each key once",
            "type": "repeated_key",
        }
        for path in repeated_json_keys(body)
    ]
    if errors:
        raise RequestValidationError(errors)
