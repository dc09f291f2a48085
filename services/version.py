"""The installed Flotilla version, for the API, the heartbeat and the CLI.

Here rather than in services.cli: nothing below the CLI imports it (the CLI pulls in httpx,
rich and click, seconds of start-up in an emulated L1).
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version


@cache
def package_version() -> str:
    """Looked up once per process (the lookup reads the package metadata from disk, ~3 ms,
    and every heartbeat carries it); a process runs the code it loaded, whatever is
    installed later."""
    try:
        return version("flotilla")
    except PackageNotFoundError:  # running from a source tree without `pip install -e .`
        return "0+unknown"
