"""`kdship train` command line (placeholder until its issue lands)."""

import typer


def train_command() -> None:
    """Not implemented yet."""
    typer.echo("kdship train: not implemented yet", err=True)
    raise typer.Exit(2)
