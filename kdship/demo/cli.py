"""`kdship demo` command line (placeholder until its issue lands)."""

import typer


def demo_command() -> None:
    """Not implemented yet."""
    typer.echo("kdship demo: not implemented yet", err=True)
    raise typer.Exit(2)
