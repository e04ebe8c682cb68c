"""Entry point of the ``qwenvl`` console command: mounts each command group.

Every command reports user mistakes (``QwenVLError``) as one readable line on stderr and exits with status 1;
no tracebacks for bad input.
"""

from __future__ import annotations

import sys

import typer

from qwenvl_cli import chat, data, demo, files, finetune, jobs, model, models_remote, stack, tenants

app = typer.Typer(
    name="qwenvl",
    help="Fine-tune and serve Qwen-VL: models, data, jobs and serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(model.app, name="model")
app.add_typer(data.app, name="data")
app.command("finetune")(finetune.finetune)
app.command("up")(stack.up)
app.command("down")(stack.down)
app.command("status")(stack.status)
app.add_typer(files.app, name="files")
app.add_typer(jobs.app, name="jobs")
app.add_typer(models_remote.app, name="models")
app.add_typer(tenants.app, name="tenants")
app.command("chat")(chat.chat)
app.command("demo")(demo.demo)


def _tolerant_output() -> None:
    """Print what the terminal's encoding cannot hold as backslash escapes instead of failing: a lone surrogate
    (a file name's undecodable byte, a record's escaped ``\\ud800``) or any character beyond an ASCII locale."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def main() -> None:
    """Run the CLI; user errors become one line and exit code 1."""
    from qwenvl_core.errors import QwenVLError

    _tolerant_output()
    try:
        app()
    except QwenVLError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
