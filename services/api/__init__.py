"""The HTTP API: FastAPI app, auth and projects, the registry (the control plane's database).

`create_app(ApiConfig(...))` builds the app; `flotilla-api` serves it with uvicorn.
"""

from services.api.app import create_app
from services.api.config import ApiConfig, Quota, TokenEntry

__all__ = ["ApiConfig", "Quota", "TokenEntry", "create_app"]
