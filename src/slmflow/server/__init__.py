"""slmflow's OpenAI-compatible HTTP server for MLflow models: `create_app(ServerSettings(...))`."""

from slmflow.server.app import create_app
from slmflow.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
