"""ECS task scale-in protection: a trainer at work is not the task a scale-in stops.

Inside an ECS task the agent's endpoint is ``$ECS_AGENT_URI``; elsewhere this does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request

log = logging.getLogger(__name__)
PROTECTION_MINUTES = 2880  # ECS's maximum (48 h); renewed with every job


def protect_task(enabled: bool, *, minutes: int = PROTECTION_MINUTES) -> bool:
    """Turn this task's scale-in protection on or off; False outside ECS or on failure."""
    agent = os.environ.get("ECS_AGENT_URI")
    if not agent:
        return False
    body: dict[str, object] = {"ProtectionEnabled": enabled}
    if enabled:
        body["ExpiresInMinutes"] = minutes
    request = urllib.request.Request(
        f"{agent}/task-protection/v1/state",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="PUT",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - agent URI
            return 200 <= response.status < 300
    except OSError as exc:  # scaling may stop this task: the lease and checkpoints cover it
        log.warning("ECS task protection %s failed: %s", "on" if enabled else "off", exc)
        return False
