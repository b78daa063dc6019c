"""Web dashboard for one queue (optional extra: ``pip install 'distcomp[dashboard]'``).

Imports Starlette lazily through :mod:`.app`, so the core package works without it.
"""

from __future__ import annotations

from .app import Dashboard, create_app, serve

__all__ = ["Dashboard", "create_app", "serve"]
