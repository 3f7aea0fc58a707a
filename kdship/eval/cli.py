"""`kdship eval` command line (placeholder until its issue lands)."""

import typer


def eval_command() -> None:
    """Not implemented yet."""
    typer.echo("kdship eval: not implemented yet", err=True)
    raise typer.Exit(2)
