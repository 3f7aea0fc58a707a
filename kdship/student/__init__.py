"""kdship student (see kdship/student/cli.py for the command line)."""
