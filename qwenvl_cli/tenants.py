"""``qwenvl tenants create|list`` (admin): tenants and their first API key through ``/v1/admin``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from qwenvl_cli.client import BaseUrlOption, Client, print_json

app = typer.Typer(help="Tenants (admin key: --admin-key / QWENVL_ADMIN_KEY / $QWENVL_HOME/admin_key).",
                  no_args_is_help=True)
AdminKeyOption = Annotated[str | None, typer.Option("--admin-key", envvar="QWENVL_ADMIN_KEY", show_default=False,
                                                    help="Admin key (default: $QWENVL_HOME/admin_key).")]


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Tenant name.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the API's answer as JSON.")] = False,
    base_url: BaseUrlOption = None, admin_key: AdminKeyOption = None,
) -> None:
    """Create a tenant; prints its id and its API key (shown once), and its MLflow login when MLflow is on."""
    with Client(base_url, admin_key, admin=True) as client:
        created = client.post("/v1/admin/tenants", {"name": name})
    if json_out:
        print_json(created)
        return
    tenant, key = created["tenant"], created["key"]
    typer.echo(f"tenant   {tenant['id']}  {tenant['name']}")
    typer.echo(f"api key  {key['key']}  (shown once; keep it)")
    mlflow = created.get("mlflow")
    if mlflow:
        typer.echo(f"mlflow   {mlflow.get('tracking_uri')}  user {mlflow.get('username')}  "
                   f"password {mlflow.get('password')}")
        if mlflow.get("experiment_url"):
            typer.echo(f"runs     {mlflow['experiment_url']}")


@app.command("list")
def list_tenants(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    base_url: BaseUrlOption = None, admin_key: AdminKeyOption = None,
) -> None:
    """Every tenant."""
    with Client(base_url, admin_key, admin=True) as client:
        rows = client.get("/v1/admin/tenants")["data"]
    if json_out:
        print_json(rows)
        return
    table = Table(Column("id", no_wrap=True), "name")
    for t in rows:
        table.add_row(t["id"], t["name"])
    Console().print(table)
