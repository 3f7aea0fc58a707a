"""kdship serve (see kdship/serve/cli.py for the command line)."""
