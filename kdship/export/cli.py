"""`kdship export` command line (placeholder until its issue lands)."""

import typer


def export_command() -> None:
    """Not implemented yet."""
    typer.echo("kdship export: not implemented yet", err=True)
    raise typer.Exit(2)
