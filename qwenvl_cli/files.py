"""``qwenvl files upload|list|show``: training data files through the REST API (``/v1/files``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table

from qwenvl_cli.client import ApiError, ApiKeyOption, BaseUrlOption, Client, print_json

app = typer.Typer(help="Upload and inspect training data files (REST API).", no_args_is_help=True)


def wait_processed(client: Client, file_id: str, timeout_s: float = 600.0) -> dict[str, Any]:
    """Poll until validation ends; ``ApiError`` with the first validation error when the file is invalid."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get(f"/v1/files/{file_id}")
        if info["status"] == "processed":
            return info
        if info["status"] == "error":
            raise ApiError(f"{file_id} ({info['filename']}) is invalid: {info.get('status_details') or 'see files show'}")
        if time.monotonic() > deadline:
            raise ApiError(f"{file_id}: still {info['status']} after {timeout_s:.0f} s")
        time.sleep(0.5)


def upload_file(client: Client, path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ApiError(f"{path}: no such file")
    with path.open("rb") as f:
        return client.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"})


@app.command("upload")
def upload(
    path: Annotated[Path, typer.Argument(help=".jsonl / .json data file or a .zip / .tar.gz bundle with images.")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until validation finishes.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the file object as JSON.")] = False,
    base_url: BaseUrlOption = None, api_key: ApiKeyOption = None,
) -> None:
    """Upload a data file; it is validated right after (status processed or error)."""
    with Client(base_url, api_key) as client:
        info = upload_file(client, path)
        if wait:
            info = wait_processed(client, info["id"])
    if json_out:
        print_json(info)
    else:
        typer.echo(f"{info['id']}  {info['filename']}  {info['bytes']} bytes  {info['status']}")


@app.command("list")
def list_files(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    base_url: BaseUrlOption = None, api_key: ApiKeyOption = None,
) -> None:
    """Your files."""
    with Client(base_url, api_key) as client:
        rows = list(client.paginate("/v1/files"))
    if json_out:
        print_json(rows)
        return
    table = Table(Column("id", no_wrap=True), "filename", "bytes", "status", "created")
    for f in rows:
        table.add_row(f["id"], f["filename"], str(f["bytes"]), f["status"],
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(f["created_at"])))
    Console().print(table)


@app.command("show")
def show(
    file_id: Annotated[str, typer.Argument(help="A file id (file-...).")],
    base_url: BaseUrlOption = None, api_key: ApiKeyOption = None,
) -> None:
    """One file with its validation report (JSON)."""
    with Client(base_url, api_key) as client:
        print_json(client.get(f"/v1/files/{file_id}"))
