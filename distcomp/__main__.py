"""``python -m distcomp`` is the ``distcomp`` command."""

from .cli import main

main()
