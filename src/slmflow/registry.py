"""Model Registry: versions and aliases, registered all-or-nothing."""

from __future__ import annotations

import re

from slmflow.errors import SlmflowError


def register(model_uri: str, name: str, alias: str | None = None, *, tags: dict[str, str] | None = None) -> str:
    """Register `model_uri` as a new version of `name` (and point `alias` at it); return the version.

    If anything after the version's creation fails, the version is deleted again, so the registry
    never holds a half-registered version.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        version = mlflow.register_model(model_uri, name, tags=tags).version
    except MlflowException as e:
        raise SlmflowError(f"cannot register {model_uri} as {name!r}: {e.message}") from e
    try:
        if alias:
            set_alias(name, alias, str(version))
    except BaseException:
        MlflowClient().delete_model_version(name, str(version))
        raise
    return str(version)


def set_alias(name: str, alias: str, version: str) -> None:
    """Point `alias` of registered model `name` at `version` (moving it if it exists)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        client.get_model_version(name, version)
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as e:
        raise SlmflowError(f"cannot point alias {alias!r} of {name!r} at version {version}: {e.message}") from e


def registered_name(model_uri: str) -> str | None:
    """`name` of `models:/name/3` and `models:/name@alias`; None for other URIs."""
    if not model_uri.startswith("models:/"):
        return None
    return re.split(r"[/@]", model_uri[len("models:/") :], maxsplit=1)[0]


def registered_version(model_uri: str) -> tuple[str, str] | None:
    """(name, version) for `models:/name/3` and `models:/name@alias`; None for other URIs."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not model_uri.startswith("models:/"):
        return None
    path = model_uri[len("models:/") :]
    try:
        if "@" in path:
            name, alias = path.split("@", 1)
            return name, str(MlflowClient().get_model_version_by_alias(name, alias).version)
        name, _, version = path.partition("/")
        if version.isdigit():
            return name, version
    except MlflowException as e:
        raise SlmflowError(f"cannot resolve {model_uri}: {e.message}") from e
    return None
