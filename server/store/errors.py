"""Errors the store raises; the API turns each into its 4xx."""


class NotFound(LookupError):
    """The named run, series or project does not exist (404)."""


class Conflict(ValueError):
    """The request contradicts what is stored (409)."""


class LimitExceeded(ValueError):
    """The request would take the store past a configured limit (422; nothing is stored)."""
