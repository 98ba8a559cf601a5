"""Subscription notifications -> the Observations they name (CONTRACT §10). Pure: a request body (and,
for a PUT to `.../Observation/<id>`, the id in its path) in, a `Notification` out; no HTTP, no state.

Three shapes reach a rest-hook endpoint, and we take all of them:
- the R4 Subscriptions Backport IG: a `history` Bundle whose first entry is the notification status (a
  `Parameters` in R4, a `SubscriptionStatus` in R4B) with its `type` (handshake, heartbeat,
  event-notification, query-status) and events whose `focus` names the resource; `full-resource`
  carries the resources as further entries, `id-only` only their URLs (HAPI; Sekmet for topic-based
  Subscriptions);
- classic R4 criteria-based rest-hook with a payload: the resource itself, PUT to
  `[endpoint]/Observation/<id>` (what the R4 specification describes, HAPI and Sekmet's default
  `put-resource`) or POSTed to the endpoint (Sekmet's `post-endpoint`);
- classic R4 without a payload: an empty POST, a "ping" that says only that something matched."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
# The focus may be absolute (Sekmet, HAPI) or relative, and may name a version.
_REFERENCE = re.compile(r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")
_STATUS_TYPES = ("Parameters", "SubscriptionStatus")
KINDS = ("handshake", "heartbeat", "event-notification", "query-status", "query-event", "ping")


class NotificationError(ValueError):
    """A body that is none of the shapes above. The message names the part, never a value."""


@dataclass(frozen=True)
class Notification:
    kind: str  # one of KINDS
    observations: tuple[dict[str, Any], ...] = ()  # full resources, as sent
    observation_ids: tuple[str, ...] = ()  # id-only: to be read from the FHIR server
    other: int = 0  # resources of other types, ignored

    @property
    def work(self) -> bool:
        return bool(self.observations or self.observation_ids)


def parse(body: bytes, path_resource: tuple[str, str] | None = None) -> Notification:
    if path_resource is not None and (not _ID.match(path_resource[1]) or not path_resource[1].strip(".")):
        raise NotificationError("the path does not end in a resource type and a FHIR id")
    if not body.strip():
        if path_resource is None:
            return Notification("ping")
        return _one(path_resource[0], path_resource[1])
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise NotificationError("the body is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("resourceType"), str):
        raise NotificationError("the body is not a FHIR resource")
    if document["resourceType"] == "Bundle":
        return _bundle(document)
    if path_resource is not None and (document["resourceType"], document.get("id")) != path_resource:
        raise NotificationError("the resource in the body is not the one named by the path")
    if document["resourceType"] != "Observation":
        return Notification("event-notification", other=1)
    if not isinstance(document.get("id"), str) or not _ID.match(document["id"]):
        raise NotificationError("the Observation has no valid id")
    return Notification("event-notification", observations=(document,))


def _one(resource_type: str, resource_id: str) -> Notification:
    if resource_type != "Observation":
        return Notification("event-notification", other=1)
    return Notification("event-notification", observation_ids=(resource_id,))


def _bundle(bundle: dict[str, Any]) -> Notification:
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)] \
        if isinstance(bundle.get("entry"), list) else []
    first = entries[0].get("resource") if entries else None
    if not isinstance(first, dict) or first.get("resourceType") not in _STATUS_TYPES:
        raise NotificationError("a notification Bundle starts with its status (Parameters or SubscriptionStatus)")
    kind, focus = _status(first)
    if kind not in KINDS:
        raise NotificationError("the notification type is not handshake, heartbeat, event-notification or a query")
    if kind not in ("event-notification", "query-event"):
        return Notification(kind)  # nothing to do, whatever else the Bundle carries
    given: dict[str, dict[str, Any]] = {}
    named: list[tuple[str, str]] = list(focus)
    other = 0
    for entry in entries[1:]:
        resource = entry.get("resource")
        if isinstance(resource, dict):
            if resource.get("resourceType") == "Observation" and isinstance(resource.get("id"), str) \
                    and _ID.match(resource["id"]):
                given[resource["id"]] = resource
            else:
                other += 1
        elif isinstance(entry.get("fullUrl"), str) and (reference := _reference(entry["fullUrl"])):
            named.append(reference)  # id-only: the entry names the resource and carries nothing
    wanted: list[str] = []
    for resource_type, resource_id in named:
        if resource_type != "Observation":
            other += resource_id not in given
        elif resource_id not in given and resource_id not in wanted:
            wanted.append(resource_id)
    return Notification(kind, tuple(given.values()), tuple(wanted), other)


def _status(status: dict[str, Any]) -> tuple[str | None, list[tuple[str, str]]]:
    """The notification type and the focus references of its events (R4 Parameters, kebab-case as the
    backport IG's examples, camelCase as some servers send; or an R4B SubscriptionStatus)."""
    if status["resourceType"] == "SubscriptionStatus":
        events = [e for e in status.get("notificationEvent") or [] if isinstance(e, dict)]
        focus = [(e.get("focus") or {}).get("reference") for e in events]
        return status.get("type"), [r for r in map(_reference, focus) if r]
    kind, focus = None, []
    for parameter in status.get("parameter") or []:
        if not isinstance(parameter, dict):
            continue
        if parameter.get("name") == "type":
            kind = parameter.get("valueCode")
        elif parameter.get("name") in ("notification-event", "notificationEvent"):
            for part in parameter.get("part") or []:
                if isinstance(part, dict) and part.get("name") == "focus":
                    reference = _reference((part.get("valueReference") or {}).get("reference"))
                    if reference:
                        focus.append(reference)
    return kind, focus


def _reference(text: Any) -> tuple[str, str] | None:
    match = _REFERENCE.search(text) if isinstance(text, str) else None
    return (match["type"], match["id"]) if match else None
