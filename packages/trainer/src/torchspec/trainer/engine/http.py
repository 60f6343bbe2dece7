"""The HTTP calls the project makes to running vLLM servers (its OpenAI API and ``/metrics``),
with the standard library: errors come out as ``OSError`` carrying the server's own words."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

__all__ = ["get_json", "get_text", "post_json"]


def get_text(url: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        raise OSError(f"HTTP {err.code}: {_detail(err)}") from None


def get_json(url: str, timeout: float) -> dict[str, Any]:
    return json.loads(get_text(url, timeout))


def post_json(url: str, body: dict[str, Any] | bytes, timeout: float) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise OSError(f"HTTP {err.code}: {_detail(err)}") from None


def _detail(err: urllib.error.HTTPError) -> str:
    return " ".join(err.read().decode(errors="replace").split())[:300]
