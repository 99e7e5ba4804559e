"""``python -m clusterlight ...`` is the same as the ``clusterlight`` command."""

from clusterlight.cli import cli_entry

if __name__ == "__main__":
    cli_entry()
