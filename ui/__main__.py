"""`python -m ui`: the Gradio UI on UI_HOST:UI_PORT (127.0.0.1:7860)."""

from __future__ import annotations

import typer

from core.settings import get_settings
from ui.launch import UiConfigError, serve

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main() -> None:
    """Serve the UI until stopped. It talks to the inference API at UI_API_URL (default: Serve)."""
    try:
        serve(get_settings())
    except UiConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(code=2) from exc


if __name__ == "__main__":
    app()
