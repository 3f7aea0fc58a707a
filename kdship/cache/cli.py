"""`kdship cache` and `kdship inspect` command line (placeholder until the cache issue lands)."""

import typer


def cache_command() -> None:
    """Not implemented yet."""
    typer.echo("kdship cache: not implemented yet", err=True)
    raise typer.Exit(2)


def inspect_command() -> None:
    """Not implemented yet."""
    typer.echo("kdship inspect: not implemented yet", err=True)
    raise typer.Exit(2)
