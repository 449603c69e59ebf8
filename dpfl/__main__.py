"""``python -m dpfl``: the same as the ``dpfl`` command."""

from dpfl.cli.main import main

main()
