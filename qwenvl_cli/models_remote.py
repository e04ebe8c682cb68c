"""``qwenvl models list|download|delete``: base models and your fine-tuned adapters through the REST API.

(``qwenvl model``, singular, works on local model directories.)
"""

from __future__ import annotations

import tarfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from qwenvl_cli.client import ApiKeyOption, BaseUrlOption, Client, print_json

app = typer.Typer(help="Base models and fine-tuned adapters served by the API.", no_args_is_help=True)


@app.command("list")
def list_models(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    base_url: BaseUrlOption = None, api_key: ApiKeyOption = None,
) -> None:
    """Models you can fine-tune and chat with."""
    with Client(base_url, api_key) as client:
        rows = client.get("/v1/models")["data"]
    if json_out:
        print_json(rows)
        return
    table = Table(Column("id", no_wrap=True), "kind", "owned_by", "created")
    for m in rows:
        created = m.get("created")
        table.add_row(m["id"], m.get("kind", ""), str(m.get("owned_by", "")),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(created)) if created else "")
    Console().print(table)


# A merged export is made on the first download (the server bounds it by QWENVL_MERGE_TIMEOUT_S, 1 h by default).
MERGED_TIMEOUT_S = 4000.0


@app.command("download")
def download(
    model_id: Annotated[str, typer.Argument(help="A fine-tuned model id (ft:...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to unpack into (adapter/, or model/ with "
                                                          "--merged).")],
    merged: Annotated[bool, typer.Option("--merged", help="The base model with the adapter merged in (a full "
                                                          "model directory) instead of the PEFT adapter.")] = False,
    base_url: BaseUrlOption = None, api_key: ApiKeyOption = None,
) -> None:
    """Download an adapter and unpack it (adapter/: adapter_config.json, adapter_model.safetensors, meta.json), or
    with --merged the merged model (model/: config.json, safetensors shards, tokenizer and processor files)."""
    out.mkdir(parents=True, exist_ok=True)
    archive = out / ("model.tar" if merged else "adapter.tar.gz")
    path = f"/v1/models/{model_id}/content" + ("?format=merged" if merged else "")
    with Client(base_url, api_key, timeout=MERGED_TIMEOUT_S if merged else 60.0) as client:
        size = client.download(path, archive)
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    archive.unlink()
    typer.echo(f"{model_id}: {size} bytes -> {out}")


@app.command("delete")
def delete(
    model_id: Annotated[str, typer.Argument(help="A fine-tuned model id (ft:...).")],
    base_url: BaseUrlOption = None, api_key: ApiKeyOption = None,
) -> None:
    """Delete an adapter (it stops being served at once; the job's record stays)."""
    with Client(base_url, api_key) as client:
        result = client.delete(f"/v1/models/{model_id}")
    typer.echo(f"deleted {result['id']}")
