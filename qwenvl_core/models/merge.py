"""Merged export: a base model with a PEFT adapter folded in, written as a complete model directory of its family.

``merge_adapter(base_dir, adapter_dir, out_dir)`` loads the base (unquantised, in the dtype its ``config.json``
names: a Q-LoRA adapter is merged onto the full-precision base, not onto NF4), applies the adapter with
``PeftModel.from_pretrained`` and ``merge_and_unload()``: LoRA deltas on the language model and the vision tower are
added to the base weights (peft computes them in fp32 on CPU) and ``modules_to_save`` (a trained merger /
``attn_pool``) replace the base modules. The result is written with the family's ``save_model`` (config,
generation config, sharded safetensors in the official key layout) and every other file of the base directory
(tokenizer, chat template, processor configs, ...) is copied, so ``detect_family(out).load_model(out)`` and
``load_processor(out)`` load it like the base. The directory appears complete or not at all.

``write_archive`` packs a directory as an uncompressed ``.tar`` (safetensors do not compress; gzip would only cost
CPU). ``python -m qwenvl_core.models.merge --base DIR --adapter DIR_OR_URI --archive PATH`` runs both (the
service's merge worker) and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch

from qwenvl_core.errors import QwenVLError
from qwenvl_core.models.peft_warnings import quiet_peft
from qwenvl_core.models.registry import ModelFamily, detect_family, read_config_json
from qwenvl_core.models.staging import staged_directory

# Weight files of a model directory: written anew by ``save_model``, never copied from the base.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCHIVE_ROOT = "model"
# Written by ``save_model`` too, but the base's own copy is kept: merging does not change how the model generates.
_BASE_WINS = frozenset({"generation_config.json"})


class MergeError(QwenVLError):
    """The adapter cannot be merged onto the base model (missing files, a mismatch between them)."""


def base_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype a model directory's weights are stored in (``dtype`` / ``torch_dtype`` of its config; fp32)."""
    config = read_config_json(model_dir)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def merged_model(base_dir: str | Path, adapter_dir: str | Path, family: ModelFamily | None = None,
                 dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The base model of ``base_dir`` with the adapter of ``adapter_dir`` merged in (eval mode)."""
    from peft import PeftModel

    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise MergeError(f"{adapter}: no adapter_config.json; is this a PEFT adapter directory?")
    family = family or detect_family(base_dir)
    base = family.load_model(base_dir, dtype=dtype or base_dtype(base_dir))
    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    except (ValueError, RuntimeError, KeyError, OSError) as err:
        message = " ".join(str(err).split())[:2000]
        raise MergeError(f"the adapter in {adapter} does not fit the base model {base_dir}: {message}") from None
    _check_loaded(peft_model, adapter, base_dir)
    return peft_model.merge_and_unload().eval()


def _check_loaded(peft_model: Any, adapter: Path, base_dir: str | Path) -> None:
    """Refuse an adapter whose saved weights are not exactly the adapter weights peft built on this base (peft
    only warns about missing or unexpected keys, which would silently merge part of an adapter)."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    saved, built = set(load_peft_weights(str(adapter), device="cpu")), set(get_peft_model_state_dict(peft_model))
    if saved != built:
        missing, unexpected = sorted(built - saved), sorted(saved - built)
        raise MergeError(f"the adapter in {adapter} does not fit the base model {base_dir}: {len(missing)} adapter "
                         f"weights missing ({', '.join(missing[:3])}), {len(unexpected)} unexpected "
                         f"({', '.join(unexpected[:3])})")


def copy_side_files(base_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the base directory's files that ``save_model`` does not write (tokenizer, processor, chat template,
    code, assets): everything except weights, hidden entries and the files ``out_dir`` already has (but
    ``generation_config.json``: the base's). Their names."""
    base, out = Path(base_dir), Path(out_dir)
    copied = []
    for entry in sorted(base.iterdir()):
        name = entry.name
        if name.startswith(".") or name.endswith(_WEIGHT_SUFFIXES + (".index.json",)):
            continue
        if (out / name).exists() and name not in _BASE_WINS:
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / name, ignore=shutil.ignore_patterns(*(f"*{s}" for s in _WEIGHT_SUFFIXES)))
        elif entry.is_file():
            shutil.copy2(entry, out / name)
        else:
            continue
        copied.append(name)
    return copied


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  dtype: torch.dtype | None = None) -> Path:
    """Write the merged model of ``base_dir`` + ``adapter_dir`` into ``out_dir`` (new or empty); ``dtype``: the
    dtype of the merged weights (default: the base's own)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):  # before the (long) merge; staged_directory checks it again
        raise MergeError(f"{out}: directory exists and is not empty; choose a new output directory")
    family = detect_family(base_dir)
    model = merged_model(base_dir, adapter_dir, family, dtype)
    with staged_directory(out, MergeError) as staging:
        family.save_model(model, staging)
        copy_side_files(base_dir, staging)
    return out


def write_archive(model_dir: str | Path, archive: str | Path, arcname: str = ARCHIVE_ROOT) -> int:
    """Pack ``model_dir`` into an uncompressed tar at ``archive`` with members under ``arcname/``; its size."""
    with tarfile.open(archive, "w") as tar:
        tar.add(str(model_dir), arcname=arcname)
    return Path(archive).stat().st_size


def _local_adapter(adapter: str, scratch: Path) -> Path:
    """A local directory with the adapter: ``adapter`` itself, or a download of a storage URI (``s3://``)."""
    if "://" not in adapter:
        return Path(adapter)
    from qwenvl_core.storage import download_dir, open_store

    store, prefix = open_store(adapter)
    if not download_dir(store, prefix, scratch / "adapter"):
        raise MergeError(f"no adapter files under {adapter}")
    return scratch / "adapter"


def main(argv: list[str] | None = None) -> int:
    """The merge worker: merge, pack, print ``{"archive", "bytes", "family"}``; a user-facing error exits 2."""
    parser = argparse.ArgumentParser(prog="python -m qwenvl_core.models.merge", description=main.__doc__)
    parser.add_argument("--base", required=True, help="Base model directory.")
    parser.add_argument("--adapter", required=True, help="PEFT adapter directory or storage URI.")
    parser.add_argument("--archive", required=True, help="Where to write the merged model's .tar.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        # scratch space next to the archive: the caller removes that directory even if this process is killed
        with tempfile.TemporaryDirectory(prefix="qwenvl-merge-", dir=Path(args.archive).parent) as tmp:
            scratch = Path(tmp)
            family = detect_family(args.base)
            merge_adapter(args.base, _local_adapter(args.adapter, scratch), scratch / "merged")
            size = write_archive(scratch / "merged", args.archive)
    except QwenVLError as err:
        print(f"MergeError: {err}", file=sys.stderr)
        return 2
    summary: dict[str, Any] = {"archive": args.archive, "bytes": size, "family": str(family.name)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
