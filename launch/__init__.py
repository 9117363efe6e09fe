"""Command-line entry points: `python -m launch <command> --help`."""
