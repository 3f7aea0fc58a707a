"""`kdship profile` command line (placeholder until its issue lands)."""

import typer


def profile_command() -> None:
    """Not implemented yet."""
    typer.echo("kdship profile: not implemented yet", err=True)
    raise typer.Exit(2)
