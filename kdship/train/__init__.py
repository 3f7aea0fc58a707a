"""kdship train (see kdship/train/cli.py for the command line)."""
