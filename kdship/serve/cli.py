"""`kdship serve` command line (placeholder until its issue lands)."""

import typer


def serve_command() -> None:
    """Not implemented yet."""
    typer.echo("kdship serve: not implemented yet", err=True)
    raise typer.Exit(2)
