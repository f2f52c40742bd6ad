"""``python -m flctl``: the same program as the ``flctl`` command."""

from flctl.cli import main

if __name__ == "__main__":
    main()
