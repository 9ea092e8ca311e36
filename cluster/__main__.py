"""`python -m cluster up|down|status|demo`."""

from __future__ import annotations

import typer

from cluster.settings import get_settings
from cluster.stack import StartupError, down, status, up

app = typer.Typer(
    pretty_exceptions_enable=False,
    help="Run the local Ray training and serving stack.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("up")
def up_command() -> None:
    """Start the Ray head, the MLflow server and the Serve app; wait until each is healthy."""
    try:
        up(get_settings(), report=typer.echo)
    except StartupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc


@app.command("down")
def down_command() -> None:
    """Stop what `up` started, and nothing else. Safe to run twice."""
    down(get_settings(), report=typer.echo)


@app.command("status")
def status_command() -> None:
    """Each component, its URL and its health."""
    rows = status(get_settings())
    for row in rows:
        mark = "up  " if row.healthy else "DOWN"
        typer.echo(f"{mark}  {row.name:<7} {row.url:<32} {row.detail}")
    if not all(r.healthy for r in rows):
        raise typer.Exit(code=1)


@app.command("demo")
def demo_command(config: str = typer.Option("jobs/configs/adult.yaml", help="job config to train")) -> None:
    """Bring everything up, train, promote, serve and print a prediction."""
    from cluster.demo import run_demo

    try:
        code = run_demo(config)
    except StartupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    raise typer.Exit(code=code)


@app.command("render-observability")
def render_observability_command() -> None:
    """Regenerate compose's Prometheus and Alertmanager configs from cluster/observability.py."""
    from cluster.observability import write_compose_files

    for path in write_compose_files():
        typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app()
