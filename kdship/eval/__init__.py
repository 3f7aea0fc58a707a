"""kdship eval (see kdship/eval/cli.py for the command line)."""
