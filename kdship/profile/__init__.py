"""kdship profile (see kdship/profile/cli.py for the command line)."""
