"""One factory for every auth type (CONTRACT §2). Secrets only by reference: an environment variable or
a file, never a literal in the config, and never in a log line or an error message."""

from __future__ import annotations

import os
from pathlib import Path

import requests
from requests.auth import AuthBase, HTTPBasicAuth

from adapter.config import AuthConfig
from adapter.errors import ConfigError


class BearerAuth(AuthBase):
    def __init__(self, token: str):
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:  # never show the token
        return "BearerAuth(<redacted>)"


def build(auth: AuthConfig) -> AuthBase | None:
    if auth.type == "none":
        return None
    if auth.type == "basic":
        if not auth.username:
            raise ConfigError("auth.username: required for auth.type = 'basic'")
        password = secret(auth.password_env, auth.password_file, "auth.password_env / auth.password_file")
        return HTTPBasicAuth(auth.username, password)
    if auth.type == "bearer":
        return BearerAuth(secret(auth.token_env, auth.token_file, "auth.token_env / auth.token_file"))
    raise ConfigError(f"auth.type: {auth.type!r} is not available in this version of anc-adapter")


def secret(env_name: str, file_path: str, keys: str) -> str:
    """The secret from the named environment variable, else the first line of the named file."""
    if env_name:
        value = os.environ.get(env_name)
        if value:
            return value
        if not file_path:
            raise ConfigError(f"{keys}: environment variable {env_name} is not set")
    if file_path:
        try:
            value = Path(file_path).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError):
            raise ConfigError(f"{keys}: cannot read a secret from {file_path}") from None
        if value:
            return value
    raise ConfigError(f"{keys}: set one of them")
