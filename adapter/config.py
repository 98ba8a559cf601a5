"""TOML configuration -> frozen dataclasses (CONTRACT §2). Every key has a default; an unknown key or a
wrong type is a ConfigError that names the key."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import parse_qsl, urlsplit

from adapter.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config/adapter.toml")
AUTH_TYPES = ("none", "basic", "bearer", "client_credentials", "smart_backend")
PROFILES = ("clinical", "ctcae-v5")
OUTPUT_RESOURCES = ("Flag", "RiskAssessment")


@dataclass(frozen=True)
class FhirConfig:
    base_url: str = ""
    timeout_s: float = 30.0
    verify: bool | str = True
    client_cert: str = ""
    client_key: str = ""
    # 1000, not CONTRACT §2's 200: measured (README "Performance"), servers page by offset and re-scan
    # every earlier row per page, so 5x fewer pages made the adapter 1.5x faster at 10k and 3.6x at 100k.
    page_size: int = 1000
    max_pages: int = 10_000  # a guard against servers whose `next` never ends
    max_bundle_entries: int = 500  # writes per transaction; some servers refuse larger bundles
    retries: int = 5  # retries of a failed call (connection, timeout, 408, 429, 5xx)
    retry_budget_s: float = 120.0  # total time one call may spend retrying
    max_requests_per_s: float = 0.0  # client-side limit for servers that throttle; 0 = no limit


@dataclass(frozen=True)
class AuthConfig:
    type: str = "none"
    username: str = ""
    password_env: str = ""
    password_file: str = ""
    token_env: str = ""
    token_file: str = ""
    client_id: str = ""
    client_secret_env: str = ""
    client_secret_file: str = ""
    private_key_file: str = ""
    kid: str = ""
    token_url: str = ""
    scope: str = ""


@dataclass(frozen=True)
class PollConfig:
    lookback_first_run: str = "P7D"
    overlap: str = "PT5M"
    statuses: tuple[str, ...] = ("final", "amended", "corrected")
    batch_observations: int = 0  # 0: page by page, joining pages that share a patient

    @property
    def lookback(self) -> timedelta:
        return parse_duration(self.lookback_first_run, "poll.lookback_first_run")

    @property
    def overlap_delta(self) -> timedelta:
        return parse_duration(self.overlap, "poll.overlap")


@dataclass(frozen=True)
class ClassifyConfig:
    profile: str = "clinical"
    pediatric: bool = True
    default_lln: float = 2000.0
    derive: bool = False


@dataclass(frozen=True)
class OutputConfig:
    resources: tuple[str, ...] = ("Flag",)
    system_base: str = "https://hospital.example/fhir/anc-adapter"
    provenance: bool = False
    risk_assessment_for_normal: bool = False  # RiskAssessment for normal counts too (CONTRACT §6: opt-in)


@dataclass(frozen=True)
class StateConfig:
    path: str = "state/anc-adapter.sqlite3"
    # postgresql://user@host:5432/db instead of `path` (pods that keep no disk); the password comes from
    # ANC_STATE_PASSWORD or libpq's PGPASSWORD / PGPASSFILE, never from this file.
    url: str = ""


@dataclass(frozen=True)
class MappingsConfig:
    path: str = ""  # a site's own copy of mappings/ (loinc.toml, units.toml, thresholds.toml); "" = shipped


@dataclass(frozen=True)
class ContextConfig:
    """Clinical context around a count (CONTRACT §5b); each part can be switched off."""

    febrile: bool = True
    projection: bool = True
    chemotherapy: bool = True
    duffy_null: bool = True
    chemotherapy_lookback: str = "P42D"

    @property
    def chemotherapy_lookback_delta(self) -> timedelta:
        return parse_duration(self.chemotherapy_lookback, "context.chemotherapy_lookback")


@dataclass(frozen=True)
class TrustedClient:
    """A CDS client (an EHR) allowed to call `serve`, and where its JWT signing keys are."""

    iss: str = ""
    jwks_url: str = ""  # fetched with a timeout and cached; never a URL taken from a token
    jwks_file: str = ""  # read once at start


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8090
    public_url: str = ""  # the base the EHR calls (the JWT `aud`); "" = http://<host>:<port>
    fhir_servers: tuple[str, ...] = ()  # the only fhirServer base URLs ever fetched from; empty = none
    order_sign_recent: str = "P7D"  # order-sign warns when no ANC is this recent
    max_body_bytes: int = 1_048_576  # a hook call with its prefetch; larger is refused (400)
    fetch_timeout_s: float = 10.0  # per FHIR read when prefetch is missing (the EHR waits for the card)
    trusted_clients: tuple[TrustedClient, ...] = ()
    # Keep R4 rest-hook Subscriptions on the FHIR server and process what they notify (docs/real-time.md).
    subscriptions: bool = False

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def order_sign_window(self) -> timedelta:
        return parse_duration(self.order_sign_recent, "serve.order_sign_recent")


@dataclass(frozen=True)
class Config:
    fhir: FhirConfig = field(default_factory=FhirConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    poll: PollConfig = field(default_factory=PollConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    state: StateConfig = field(default_factory=StateConfig)
    mappings: MappingsConfig = field(default_factory=MappingsConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def with_overrides(self, **sections: dict[str, Any]) -> Config:
        changed = {
            name: dataclasses.replace(getattr(self, name), **values)
            for name, values in sections.items()
            if values
        }
        return _validated(dataclasses.replace(self, **changed))


_DURATION = re.compile(
    r"^P(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)


def parse_duration(text: str, key: str) -> timedelta:
    """ISO 8601 duration without years and months (their length is ambiguous): P7D, PT5M, P1DT12H."""
    match = _DURATION.match(text)
    if not match or text in ("P", "PT") or text.endswith("T"):
        raise ConfigError(f"{key}: {text!r} is not an ISO 8601 duration such as 'P7D' or 'PT5M'")
    parts = {name: float(value) for name, value in match.groupdict().items() if value}
    return timedelta(**parts)


def load(path: Path | None) -> Config:
    """Read the config file; None means no file (defaults only)."""
    if path is None:
        return _validated(Config())
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return _validated(_build(Config, raw, ""))


def resolve_path(explicit: str | None) -> Path | None:
    """--config, else $ANC_ADAPTER_CONFIG, else config/adapter.toml if it exists, else no file."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get("ANC_ADAPTER_CONFIG")
    if from_env:
        return Path(from_env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def as_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a table")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = f"[{prefix}] " if prefix else ""
        raise ConfigError(f"{where}unknown key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key)
        elif _table_list(hint):
            # An array of tables ([[serve.trusted_clients]]): each table is checked like a section.
            if not isinstance(value, list):
                raise ConfigError(f"{key}: expected an array of tables ([[{key}]])")
            values[name] = tuple(_build(_table_list(hint), item, f"{key}[{i}]") for i, item in enumerate(value))
        else:
            values[name] = _coerce(hint, value, key)
    return cls(**values)


def _table_list(hint: Any) -> type | None:
    """The dataclass of a tuple[SomeDataclass, ...] field, else None."""
    args = get_args(hint) if get_origin(hint) is tuple else ()
    return args[0] if args and dataclasses.is_dataclass(args[0]) else None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    allowed = get_args(hint) if origin is not None else (hint,)
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is bool and isinstance(value, bool):
            return value
        if kind in (int, str) and type(value) is kind:
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def _validated(config: Config) -> Config:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{key}: {why}")

    if config.fhir.base_url and not re.match(r"^https?://", config.fhir.base_url):
        raise bad("fhir.base_url", f"must start with http:// or https://, got {config.fhir.base_url!r}")
    if config.fhir.timeout_s <= 0:
        raise bad("fhir.timeout_s", "must be > 0")
    if not 1 <= config.fhir.page_size <= 5000:
        raise bad("fhir.page_size", "must be between 1 and 5000")
    if config.fhir.max_bundle_entries < 2:
        raise bad("fhir.max_bundle_entries", "must be >= 2")
    if config.fhir.retries < 0:
        raise bad("fhir.retries", "must be >= 0")
    if config.fhir.retry_budget_s < 0:
        raise bad("fhir.retry_budget_s", "must be >= 0")
    if not 0 <= config.fhir.max_requests_per_s < math.inf:  # also refuses nan, which TOML allows
        raise bad("fhir.max_requests_per_s", f"must be a number >= 0 (0 = no limit), got "
                                             f"{config.fhir.max_requests_per_s!r}")
    if config.fhir.max_pages < 1:
        raise bad("fhir.max_pages", "must be >= 1")
    if config.auth.type not in AUTH_TYPES:
        raise bad("auth.type", f"must be one of {', '.join(AUTH_TYPES)}, got {config.auth.type!r}")
    if config.classify.profile not in PROFILES:
        raise bad("classify.profile", f"must be one of {', '.join(PROFILES)}, got {config.classify.profile!r}")
    if config.classify.default_lln <= 0:
        raise bad("classify.default_lln", "must be > 0 (cells/µL)")
    unknown = sorted(set(config.output.resources) - set(OUTPUT_RESOURCES))
    if unknown or not config.output.resources:
        raise bad("output.resources", f"must be a non-empty list of {', '.join(OUTPUT_RESOURCES)}")
    if not re.match(r"^https?://", config.output.system_base):
        raise bad("output.system_base", "must be an absolute http(s) URL")
    if not config.poll.statuses:
        raise bad("poll.statuses", "must not be empty")
    if not 0 <= config.poll.batch_observations <= 1_000_000:
        raise bad("poll.batch_observations", "must be between 0 (page by page) and 1000000")
    config.poll.lookback  # noqa: B018 - parses, raising ConfigError naming the key
    config.poll.overlap_delta  # noqa: B018
    if config.context.chemotherapy_lookback_delta <= timedelta(0):
        raise bad("context.chemotherapy_lookback", "must be a positive duration such as 'P42D'")
    _validated_state(config.state)
    _validated_serve(config.serve)
    return config


def _validated_state(state: StateConfig) -> None:
    if not state.url:
        return
    if not state.url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("state.url: must be a postgresql:// URL (a SQLite state is set with state.path)")
    if state.path != StateConfig.path:
        raise ConfigError("state.url and state.path: both set; give one (url for PostgreSQL, path for SQLite)")
    parts = urlsplit(state.url)
    if parts.password is not None or any(k.lower() == "password" for k, _ in parse_qsl(parts.query)):
        # A config file is copied, committed and shown in tickets: the secret lives in the environment.
        raise ConfigError("state.url: holds a password; remove it and give it in ANC_STATE_PASSWORD "
                          "(or libpq's PGPASSWORD / PGPASSFILE)")


def _validated_serve(serve: ServeConfig) -> None:
    if not 0 <= serve.port <= 65535:
        raise ConfigError("serve.port: must be between 0 and 65535")
    if serve.public_url and not re.match(r"^https?://[^/?#]+(/[^?#]*)?$", serve.public_url):
        raise ConfigError(f"serve.public_url: must be an absolute http(s) URL, got {serve.public_url!r}")
    for i, url in enumerate(serve.fhir_servers):
        if not re.match(r"^https?://[^/?#@]+(/[^?#]*)?$", url):
            raise ConfigError(f"serve.fhir_servers[{i}]: must be an http(s) base URL without user, query "
                              f"or fragment, got {url!r}")
    if serve.subscriptions and not serve.public_url and serve.host in ("0.0.0.0", "::", ""):
        # The FHIR server cannot call back a wildcard address: it needs the URL it can reach us at.
        raise ConfigError(f"serve.public_url: required with serve.subscriptions when host is {serve.host!r}")
    if serve.max_body_bytes < 1024:
        raise ConfigError("serve.max_body_bytes: must be >= 1024")
    if serve.fetch_timeout_s <= 0:
        raise ConfigError("serve.fetch_timeout_s: must be > 0")
    if serve.order_sign_window <= timedelta(0):
        raise ConfigError("serve.order_sign_recent: must be longer than zero")
    issuers = [client.iss for client in serve.trusted_clients]
    for i, client in enumerate(serve.trusted_clients):
        key = f"serve.trusted_clients[{i}]"
        if not client.iss:
            raise ConfigError(f"{key}.iss: missing; the issuer (iss) the EHR puts in its JWTs")
        if issuers.count(client.iss) > 1:
            raise ConfigError(f"{key}.iss: {client.iss!r} is listed twice")
        if bool(client.jwks_url) == bool(client.jwks_file):
            raise ConfigError(f"{key}: give exactly one of jwks_url and jwks_file")
        # A JWKS over plain http could be swapped in transit, and with it every key we trust; only a
        # loopback address (a sidecar, a test) may use http.
        if client.jwks_url and not re.match(r"^(https://|http://(127\.0\.0\.1|localhost|\[::1\])[:/])",
                                            client.jwks_url):
            raise ConfigError(f"{key}.jwks_url: must be an https URL (http only on loopback)")
