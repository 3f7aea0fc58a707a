"""kdship demo (see kdship/demo/cli.py for the command line)."""
