"""Error types and the exit codes they map to (CONTRACT §1). The CLI reads the type, never the text."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    CONFIG = 2
    UNREACHABLE = 3
    AUTH = 4
    LOCKED = 5
    STOPPED = 6


class AdapterError(Exception):
    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigError(AdapterError):
    """Usage or configuration error; the message names the key and what is wrong."""

    exit_code = ExitCode.CONFIG


class FhirError(AdapterError):
    """The server kept failing or answered something we cannot use."""

    exit_code = ExitCode.UNREACHABLE


class TransientHttpError(FhirError):
    """Worth retrying: connection trouble, timeouts, 408/429/5xx. Carries Retry-After when given."""

    def __init__(self, message: str, retry_after_s: float | None = None, status: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status


class PermanentHttpError(FhirError):
    """A 4xx (other than 401/403/408/429) or an unusable body: retrying would not help."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class SearchTruncated(FhirError):
    """Paging stopped before the server said it was done (page cap, a repeated next link): every page
    read was processed, but the pass is incomplete and must not move the watermark."""


class AuthError(AdapterError):
    exit_code = ExitCode.AUTH


class LockHeldError(AdapterError):
    exit_code = ExitCode.LOCKED


class Stopped(AdapterError):
    """SIGTERM or SIGINT: the run stops at a safe point. Not a FhirError, so no retry or per-patient
    fallback ever swallows it on its way out."""

    exit_code = ExitCode.STOPPED
