"""``python -m zoo ...`` is the same as the ``zoo`` command."""

from zoo.commands import main

main()
