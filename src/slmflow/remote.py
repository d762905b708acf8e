"""A tracking server's refusals (401, 403) and absences as one line a person can act on.

MLflow reports them as "API request to endpoint /api/2.0/mlflow/registered-models/alias failed with
error code 403 != 200. Response body: 'Permission denied'": no user, no model, no permission. The
endpoint tells what kind of thing was refused and which permission that takes; the command knows
which model it was working on.
"""

from __future__ import annotations

import os
import re

# Endpoint fragments -> (what they act on, the permission MLflow's basic auth asks for). First match wins.
_RULES: tuple[tuple[str, str, str], ...] = (
    ("registered-models/get", "registered model", "READ"),
    ("registered-models/search", "registered model", "READ"),
    ("model-versions/get", "registered model", "READ"),
    ("model-versions/search", "registered model", "READ"),
    ("registered-models/alias", "registered model", "EDIT"),
    ("registered-models/delete", "registered model", "MANAGE"),
    ("model-versions/delete", "registered model", "MANAGE"),
    ("registered-models", "registered model", "EDIT"),
    ("model-versions", "registered model", "EDIT"),
    ("experiments/get", "experiment", "READ"),
    ("experiments/search", "experiment", "READ"),
    ("runs/get", "experiment", "READ"),
    ("runs/search", "experiment", "READ"),
    ("mlflow-artifacts", "experiment", "EDIT"),
    ("logged-models", "experiment", "EDIT"),
    ("traces", "experiment", "EDIT"),
    ("runs", "experiment", "EDIT"),
    ("experiments", "experiment", "EDIT"),
)
_ENDPOINT = re.compile(r"(/api/[0-9.]+/\S+?|/v1/traces)(?:[\s?]|$)")


def refusal(error: BaseException) -> int | None:
    """401 or 403 when `error` is a tracking server refusing the request, else None."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}.get(error.error_code)
    response = getattr(error, "response", None)  # requests.HTTPError from an artifact upload or download
    status = getattr(response, "status_code", None)
    return status if status in (401, 403) else None


def describe(error: BaseException, model: str | None = None) -> str:
    """One line for a refusal: who, what permission, on what, at which server, and what to do."""
    import mlflow

    server = mlflow.get_tracking_uri()
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if refusal(error) == 401:
        if not user:
            return f"the tracking server at {server} needs credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        return f"the tracking server at {server} refused the credentials of user {user!r} (MLFLOW_TRACKING_PASSWORD)"
    text = str(error)
    found = _ENDPOINT.search(text)
    endpoint = found.group(1) if found else None
    kind, permission = _rule(endpoint or "")
    if kind == "registered model" and model:
        subject = f"registered model {model!r}"
    elif kind == "experiment":
        subject = f"experiment {_experiment_name()!r}"
    else:
        subject = kind
    who = f"user {user!r}" if user else "this client (no MLFLOW_TRACKING_USERNAME)"
    where = f" ({endpoint})" if endpoint else ""
    return (
        f"{who} lacks {permission} permission on {subject} at {server}{where}; "
        "an admin of the server can grant it (MLflow basic auth: grant_user_permission)"
    )


def _rule(endpoint: str) -> tuple[str, str]:
    for fragment, kind, permission in _RULES:
        if fragment in endpoint:
            return kind, permission
    return "this resource", "the needed"


def _experiment_name() -> str:
    """The experiment this process logs to, as MLflow picks it from the environment."""
    if name := os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return name
    if experiment_id := os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return f"id {experiment_id}"
    return "Default"


def unreachable(error: BaseException) -> str | None:
    """One line when `error` is the tracking server not answering (refused, reset, timed out), else None.

    MLflow's own message is a page of urllib3 internals, and names the last endpoint it tried (often
    the run's final status update, not the upload that failed first).
    """
    import mlflow

    text = str(error)
    for marker, reason in (
        ("Connection refused", "connection refused"),
        ("timed out", "timed out"),
        ("Connection reset", "connection reset"),
        ("RemoteDisconnected", "it closed the connection"),
        ("Connection aborted", "connection aborted"),
        ("Name or service not known", "unknown host"),
    ):
        if marker in text and ("API request to" in text or "HTTPConnectionPool" in text):
            return f"cannot reach the tracking server at {mlflow.get_tracking_uri()}: {reason}"
    return None


def model_name(params: dict[str, object]) -> str | None:
    """The registered model a command works on, from its arguments (`name`, or a models:/ URI)."""
    name = params.get("name")
    if isinstance(name, str) and name:
        return name
    from slmflow.registry import registered_name

    return next((n for v in params.values() if isinstance(v, str) and (n := registered_name(v))), None)
