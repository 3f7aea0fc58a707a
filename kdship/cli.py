"""The ``kdship`` command line: one verb per subpackage, each CLI function a thin wrapper.

Verb modules (``kdship/<verb>/cli.py``) import only light modules at import time so that
``kdship --help`` is fast; torch / vLLM / ONNX Runtime are imported inside the commands.
"""

from __future__ import annotations

import typer

from kdship import __version__

app = typer.Typer(
    name="kdship",
    help="Offline knowledge distillation for LLMs: cache -> student -> train -> export -> serve/profile -> eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdship {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


def _register() -> None:
    from kdship.cache.cli import cache_command, inspect_command
    from kdship.student.cli import student_command
    from kdship.train.cli import train_command
    from kdship.export.cli import export_command
    from kdship.serve.cli import serve_command
    from kdship.profile.cli import profile_command
    from kdship.eval.cli import eval_command
    from kdship.demo.cli import demo_command

    app.command("cache")(cache_command)
    app.command("inspect")(inspect_command)
    app.command("student")(student_command)
    app.command("train")(train_command)
    app.command("export")(export_command)
    app.command("serve")(serve_command)
    app.command("profile")(profile_command)
    app.command("eval")(eval_command)
    app.command("demo")(demo_command)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
