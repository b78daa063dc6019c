"""distcomp: run thousands of independent experiments on one machine or many nodes.

Redis is the single source of truth; every state change is one atomic Lua
script. See docs/architecture.md for the design and its invariants.
"""

from .spec import SpecError, TaskSpec

__version__ = "0.1.0"

__all__ = ["SpecError", "TaskSpec", "__version__"]
