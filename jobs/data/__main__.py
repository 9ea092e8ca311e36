"""`python -m jobs.data push FILE`: upload a data set version to the object store."""

from __future__ import annotations

from pathlib import Path

import typer

from core.settings import get_settings
from jobs.data.storage import push_file, read_uri

app = typer.Typer(pretty_exceptions_enable=False, help="Data set versions in the object store.", no_args_is_help=True)


@app.command()
def push(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
    name: str | None = typer.Option(None, help="data set name (default: the file's stem)"),
) -> None:
    """Upload FILE under its sha256 digest and print the URI a job config names."""
    try:
        uri = push_file(file, name=name, settings=get_settings())
    except Exception as exc:
        typer.echo(f"error: cannot push {file}: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    typer.echo(uri)


@app.command()
def digest(uri: str) -> None:
    """Print the sha256 digest of a data set file (local path or s3:// URI)."""
    typer.echo(read_uri(uri, get_settings()).sha256)


if __name__ == "__main__":
    app()
