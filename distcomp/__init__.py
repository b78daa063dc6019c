"""distcomp: run thousands of independent experiments on one machine or many nodes.

Redis is the single source of truth; every state change is one atomic Lua
script. See docs/architecture.md for the design and its invariants.
"""

from typing import TYPE_CHECKING, Any

from .spec import SpecError, TaskSpec

if TYPE_CHECKING:
    from .client import Client
    from .executor import Executor, RemoteError

__version__ = "0.1.0"

__all__ = ["Client", "Executor", "RemoteError", "SpecError", "TaskSpec", "__version__"]


def __getattr__(name: str) -> Any:
    """Client and Executor load on first use: every python task's interpreter imports
    this package (``python -m distcomp.pytask``), and should not pay for redis-py."""
    if name == "Client":
        from .client import Client

        return Client
    if name in ("Executor", "RemoteError"):
        from . import executor

        return getattr(executor, name)
    raise AttributeError(f"module 'distcomp' has no attribute {name!r}")
