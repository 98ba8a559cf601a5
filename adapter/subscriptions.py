"""Our Subscriptions on the FHIR server (CONTRACT §10): what they are, their tokens, and keeping them in
place at every `serve` start, idempotently.

Classic R4 criteria-based rest-hook Subscriptions, one per criteria: the one kind both HAPI (R4) and
Sekmet 0.1.1 deliver for any search criteria without a server-side topic (Sekmet's Backport topics are
a fixed built-in list with no Observation topic; HAPI's need a SubscriptionTopic the site defines). The
endpoint also takes Backport IG notifications (adapter/sources/notifications.py), for a site that points
a topic-based Subscription at it.

Each Subscription carries its own random token in `channel.header`, which the server sends back on every
notification. The token is kept in the state (created 0600, beside the ledger it protects), so a restart
keeps it and the server's retries of a notification sent before the restart still authenticate."""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B.subscription import Subscription

from adapter.errors import PermanentHttpError
from adapter.fhir.client import FhirClient
from adapter.mappings import Mappings
from adapter.state import State

log = logging.getLogger(__name__)

ANC = "anc"
TEMPERATURE = "temperature"
_LIVE = ("active", "requested")


@dataclass(frozen=True)
class Spec:
    name: str  # also the last part of the notification URL
    criteria: str
    reason: str


def specs(mappings: Mappings, derive: bool) -> tuple[Spec, ...]:
    codes = list(mappings.anc_codes) + (sorted(mappings.input_kinds()) if derive else [])
    anc = ",".join(f"{system}|{code}" for system, code in codes)
    return (
        Spec(ANC, f"Observation?code={anc}",
             "anc-adapter: grade new absolute neutrophil counts within seconds"),
        # The temperature codes `run` reads (mappings/context.toml): a notified fever is one run would see.
        Spec(TEMPERATURE, "Observation?code=" + ",".join(f"{system}|{code}" for system, code
                                                       in mappings.context.temperature_codes),
             "anc-adapter: temperatures for febrile neutropenia"),
    )


def subscription_id(system_base: str, name: str) -> str:
    """Derived from our identifier root, so every start of the same deployment finds the same resource
    (a Subscription has no identifier element in R4 to make a conditional update on)."""
    digest = hashlib.sha256(system_base.rstrip("/").encode()).hexdigest()[:12]
    return f"anc-adapter-{name}-{digest}"


def endpoint(public_url: str, name: str) -> str:
    return f"{public_url.rstrip('/')}/notifications/{name}"


def token(state: State, name: str) -> str:
    return state.pinned(f"subscription-token:{name}", secrets.token_urlsafe(32))


def build(spec: Spec, system_base: str, public_url: str, secret: str) -> dict[str, Any]:
    resource = {
        "resourceType": "Subscription",
        "id": subscription_id(system_base, spec.name),
        "meta": {"tag": [{"system": f"{system_base.rstrip('/')}/tag", "code": "anc-adapter"}]},
        "status": "requested",  # the server makes it active once it accepts it
        "reason": spec.reason,
        "criteria": spec.criteria,
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint(public_url, spec.name),
            # A payload asks for the resource itself (full-resource): no read back for each notification.
            "payload": "application/fhir+json",
            "header": [f"Authorization: Bearer {secret}"],
        },
    }
    Subscription.model_validate(resource)
    return resource


def ensure(client: FhirClient, wanted: dict[str, Any]) -> str:
    """Put one Subscription in place: "created", "updated" or "unchanged". A Subscription the server
    set to `error` or `off` (deliveries failed) is put back to `requested`, which revives it."""
    try:
        current = client.get(f"Subscription/{wanted['id']}")
    except PermanentHttpError as exc:
        if exc.status not in (404, 410):
            raise
        current = None
    if current is not None and _same(current, wanted):
        return "unchanged"
    client.update(f"Subscription/{wanted['id']}", wanted)
    return "created" if current is None else "updated"


def _same(current: dict[str, Any], wanted: dict[str, Any]) -> bool:
    channel, mine = current.get("channel") or {}, wanted["channel"]
    return (current.get("status") in _LIVE and current.get("criteria") == wanted["criteria"]
            and all(channel.get(key) == mine[key] for key in ("type", "endpoint", "payload", "header")))
