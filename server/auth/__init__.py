"""Who may do what: the gate in front of every route (``gate``), the access rule of every
route (``access``), API tokens (``tokens``) and the gate's request reading (``gate_io``).

The names below are this package's public surface, what the dashboard may use: the login
cookie's name, the same-origin check of its login form, the principal's visible projects and runs, and
``Denied`` (a refusal with its status and headers, e.g. the failed-login throttle's 429).
"""

from .gate import COOKIE, Denied, same_origin, visible_project, visible_projects, visible_runs

__all__ = ["COOKIE", "Denied", "same_origin", "visible_project", "visible_projects", "visible_runs"]
