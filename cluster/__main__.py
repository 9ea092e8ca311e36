"""`python -m cluster up|down|status|demo|keys ...`."""

from __future__ import annotations

import typer

from cluster.health import status
from cluster.keys import keys_app
from cluster.stack import down, up
from cluster.startup import StartupError
from core.settings import get_settings

app = typer.Typer(
    pretty_exceptions_enable=False,
    help="Run the local Ray training and serving stack.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(keys_app, name="keys")


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
        typer.echo(f"{mark}  {row.name:<17} {row.url:<32} {row.detail}")
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


@app.command("render-edge")
def render_edge_command() -> None:
    """Regenerate compose's Nginx config from cluster/nginx/nginx.conf.j2 (cluster/edge.py)."""
    from cluster.edge import write_compose_file

    typer.echo(f"wrote {write_compose_file()}")


@app.command("render-kuberay")
def render_kuberay_command() -> None:
    """Regenerate cluster/kuberay's RayService and RayJob from serve_apps/config.yaml (cluster/scale_out.py)."""
    from cluster.scale_out import write_kuberay_files

    for path in write_kuberay_files():
        typer.echo(f"wrote {path}")


@app.command("deploy-serve")
def deploy_serve_command() -> None:
    """Deploy the Serve app from serve_apps/config.yaml to a running Ray cluster, as `up` does; wait until it runs."""
    from cluster.apps import deploy_serve
    from cluster.supervisor import child_environment

    settings = get_settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)  # the rendered config is written there
    try:
        typer.echo(f"serve: {deploy_serve(settings, child_environment(settings))} at {settings.serve.url}")
    except StartupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc


if __name__ == "__main__":
    app()
