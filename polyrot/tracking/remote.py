"""What a client checks before it uses a tracking server: that it answers, and that it accepts the
credentials MLflow will send (MLFLOW_TRACKING_USERNAME / _PASSWORD, or ~/.mlflow/credentials).

One request, no retries: MLflow's own client retries a refused connection for minutes with backoff,
which reads as a hang; this turns each way of not getting in into one line before any run starts.
The password is never part of a message.
"""

from __future__ import annotations

import re

from polyrot.errors import TrackingServerError

# An authenticated read that every role may make: a reader gets 200, a wrong password 401.
PROBE = "/api/2.0/mlflow/experiments/search"
TIMEOUT_S = 10


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether the MLflow server at `url` answers its (unauthenticated) health check."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def reason(exc: Exception) -> str:
    """The innermost cause of a failed connection (urllib3 nests it in a long sentence)."""
    text = str(exc)
    for pattern in (r"\[Errno -?\d+\] ([^')\"]+)", r"(Connection refused|timed out|Name or service not known)"):
        found = re.search(pattern, text)
        if found:
            return found.group(1).strip()
    return text.splitlines()[0][:120] if text else type(exc).__name__


def check(uri: str) -> None:
    """Raise TrackingServerError unless the server at `uri` answers an authenticated read."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        resp = http_request(creds, PROBE, "GET", max_retries=0, timeout=TIMEOUT_S, raise_on_status=False,
                            params={"max_results": 1})
    except Exception as exc:  # noqa: BLE001 - MlflowException or requests' errors: each means "not reachable"
        raise TrackingServerError(f"tracking server {uri} is not reachable: {reason(exc)}") from None
    if resp.status_code == 401:
        if not creds.username:
            raise TrackingServerError(f"tracking server {uri} needs credentials: set MLFLOW_TRACKING_USERNAME "
                                      "and MLFLOW_TRACKING_PASSWORD")
        raise TrackingServerError(f"tracking server {uri} refused the credentials of user {creds.username!r} "
                                  "(401: wrong username or password)")
    if resp.status_code != 200:
        raise TrackingServerError(f"tracking server {uri} answered {resp.status_code} to a search: "
                                  f"{resp.text.strip().splitlines()[0][:120] if resp.text.strip() else ''}")


def refusal(exc: BaseException, username: str | None) -> str | None:
    """One line for a request the server refused mid-command (a reader creating a run: 403), else None."""
    code = getattr(exc, "error_code", None)
    if code not in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return None
    endpoint = re.search(r"endpoint (\S+)", str(exc))
    what = endpoint.group(1).replace("/api/2.0/mlflow/", "").replace("/api/3.0/mlflow/", "") if endpoint else "a request"
    status = 403 if code == "PERMISSION_DENIED" else 401
    who = f"user {username!r}" if username else "an anonymous client"
    return f"the tracking server refused {what} to {who} ({status}: {'permission denied' if status == 403 else 'not authenticated'})"
