"""``qwenvl chat MODEL "question" [--image PATH ...] [--save-boxes OUT.png]``: one chat completion through the API.

Images travel inline as ``data:`` URLs. The answer is printed, then the grounding boxes the API returns (the
``grounding`` extension of the choice, in pixels of each input image); ``--save-boxes`` writes the first image
with its boxes drawn.
"""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path
from typing import Annotated, Any

import typer

from qwenvl_cli.client import ApiError, ApiKeyOption, BaseUrlOption, Client, check_finite, print_json


def data_url(path: Path) -> str:
    if not path.is_file():
        raise ApiError(f"--image {path}: no such file")
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def chat_body(model: str, question: str, images: list[Path], max_tokens: int, temperature: float) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images]
    content.append({"type": "text", "text": question})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": temperature}


def save_boxes(image_path: Path, grounding: dict[str, Any], out: Path) -> Path:
    """``image_path`` with the pixel boxes of one ``grounding`` entry drawn (labelled with their refs)."""
    from PIL import Image

    from qwenvl_core.models.qwen_vl.grounding import GroundedObject, draw_boxes, normalize_box

    with Image.open(image_path) as image:
        w, h = image.size
        objects = [GroundedObject(o.get("ref"), normalize_box(o["box"], w, h)) for o in grounding["objects"]]
        out.parent.mkdir(parents=True, exist_ok=True)
        draw_boxes(image, objects).save(out)
    return out


def ask(client: Client, model: str, question: str, images: list[Path], *, max_tokens: int = 64,
        temperature: float = 0.0) -> dict[str, Any]:
    """The chat completion object for one question."""
    return client.post("/v1/chat/completions", chat_body(model, question, images, max_tokens, temperature))


def chat(
    model: Annotated[str, typer.Argument(help="A base model id or your fine-tuned model id (ft:...).")],
    question: Annotated[str, typer.Argument(help="The question.")],
    image: Annotated[list[Path] | None, typer.Option("--image", "-i", help="An image (repeatable).")] = None,
    save: Annotated[Path | None, typer.Option("--save-boxes", help="Save the first image with its boxes drawn.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the API's answer as JSON.")] = False,
    base_url: BaseUrlOption = None, api_key: ApiKeyOption = None,
) -> None:
    """Ask a model a question about images; prints the answer and its grounding boxes."""
    check_finite(temperature=temperature)
    images = list(image or [])
    with Client(base_url, api_key, timeout=300) as client:
        completion = ask(client, model, question, images, max_tokens=max_tokens, temperature=temperature)
    choice = completion["choices"][0]
    if json_out:
        print_json(completion)
    else:
        typer.echo(choice["message"]["content"])
        for g in choice.get("grounding") or []:
            for o in g["objects"]:
                box = ", ".join(f"{v:.0f}" for v in o["box"])
                typer.echo(f"  box: image {g['image_index'] + 1} ({g['width']}x{g['height']}): "
                           f"{o.get('ref') or '-'} [{box}] px")
    if save is not None:
        first = next((g for g in choice.get("grounding") or [] if g["objects"]), None)
        if first is None or not images:
            raise ApiError("--save-boxes: the answer has no grounding boxes to draw")
        typer.echo(f"saved {save_boxes(images[first['image_index']], first, save)}")
