"""Every route without the key or with a wrong one: 401 or 403, nothing else."""

from __future__ import annotations

import re
import uuid

from fastapi.testclient import TestClient

from services.api.main import create_app
from shared.bus import Bus
from shared.settings import ApiSettings

KEY = "right-key-" + uuid.uuid4().hex
#: routes anyone may call: health for load balancers, the static page (it asks for the key)
#: and the API's description
PUBLIC = {"/healthz", "/readyz", "/ui", "/", "/openapi.json", "/docs", "/docs/oauth2-redirect",
          "/redoc"}  # fmt: skip
AUTHORIZATIONS = {
    "no header": None,
    "empty bearer": "Bearer ",
    "wrong key": "Bearer wrong",
    "key prefix": f"Bearer {KEY[:-1]}",
    "key plus a character": f"Bearer {KEY}x",
    "other scheme": f"Basic {KEY}",
    "key without scheme": KEY,
    "upper-case key": f"Bearer {KEY.upper()}",
    "two keys": f"Bearer wrong, Bearer {KEY}",
}
#: no bearer credentials at all: 401 (with WWW-Authenticate); a wrong bearer key: 403
NO_BEARER = {"no header", "empty bearer", "other scheme", "key without scheme"}
BODIES = [None, b"{}", b"{not json", b'{"name": "x", "dataset": {"source": "x.jsonl"}}']


def _paths(routes, prefix: str = "") -> list[tuple[str, str]]:
    """(method, path) of every route, included routers walked (FastAPI keeps them nested)."""
    found = []
    for route in routes:
        if hasattr(route, "original_router"):
            inner = prefix + route.include_context.prefix
            found += _paths(route.original_router.routes, inner)
        elif hasattr(route, "methods"):
            path = re.sub(r"\{[^}]+\}", "x", prefix + route.path)
            found += [(method, path) for method in sorted(route.methods or ["GET"])]
    return found


def test_unauthenticated_and_wrong_key_requests_are_refused_on_every_route(scenario, tmp_path):
    outcome = scenario(
        "unauthenticated and wrong-key requests",
        full=1,
        ci=1,
        must_hold="401/403 on every protected route, nothing else",
    )
    settings = ApiSettings(
        var_dir=tmp_path, broker_url="memory://", api_key=KEY, exchange=f"t{uuid.uuid4().hex[:8]}"
    )
    app = create_app(settings, bus=Bus(settings))
    routes = _paths(app.routes)
    protected = [(m, p) for m, p in routes if p not in PUBLIC and m != "HEAD"]
    outcome.count("routes", len({p for _, p in routes}))
    outcome.count("protected method+route pairs", len(protected))
    with TestClient(app) as client:
        for method, path in protected:
            for label, authorization in AUTHORIZATIONS.items():
                for body in BODIES if method in ("POST", "PUT", "PATCH") else [None]:
                    headers = {"Authorization": authorization} if authorization else {}
                    response = client.request(method, path, headers=headers, content=body)
                    outcome.count("requests")
                    expected = 401 if label in NO_BEARER else 403
                    if response.status_code in (401, 403):
                        outcome.count(f"{response.status_code}")
                    outcome.check(
                        response.status_code in (401, 403) and "detail" in response.json(),
                        f"{method} {path} with {label}: {response.status_code}",
                    )
                    outcome.check(
                        response.status_code == expected,
                        f"{method} {path} with {label}: {response.status_code}, not {expected}",
                    )
                    outcome.check(KEY not in response.text, f"{method} {path} echoes the key")
        # Public routes answer without a key and never say anything about jobs or models.
        for path in sorted(PUBLIC & {p for _, p in routes}):
            response = client.get(path)
            outcome.count("public requests")
            outcome.check(response.status_code < 500, f"public {path}: {response.status_code}")
        # And the right key gets through (so the refusals above were about the key).
        ok = client.get("/v1/jobs", headers={"Authorization": f"Bearer {KEY}"})
        outcome.check(ok.status_code == 200, f"right key refused: {ok.status_code}")
    unlisted = {p for _, p in routes} - PUBLIC - {p for _, p in protected}
    outcome.check(not unlisted, f"routes neither public nor protected: {unlisted}")
    outcome.check(len(protected) >= 10, "fewer protected routes than the API has")
    outcome.verdict()
