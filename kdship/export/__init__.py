"""kdship export (see kdship/export/cli.py for the command line)."""
