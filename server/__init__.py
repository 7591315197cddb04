"""The Stethoscope service (``pip install 'stethoscope[server]'``); ``app.create_app`` is its
composition root."""

from importlib.metadata import PackageNotFoundError, version

try:
    #: The distribution's version (pyproject.toml), read from its metadata: the server does not
    #: import the hook to learn it.
    __version__ = version("stethoscope")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"
