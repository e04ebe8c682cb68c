"""``qwenvl model init|info``: once through the installed console script (a real subprocess), otherwise through
its entry point in this process (``conftest.entry_point``: the same code without an interpreter start per call)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.cli.conftest import QWENVL, entry_point

_qwenvl = entry_point


def test_model_init_then_info_json(tmp_path):
    out = tmp_path / "tiny"
    done = subprocess.run([QWENVL, "model", "init", "--preset", "qwen-vl-tiny", "--out", str(out), "--seed", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "config.json").is_file() and (out / "qwen.tiktoken").is_file()
    info = _qwenvl("model", "info", str(out), "--json", "--keys")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["family"] == "qwen-vl"
    params = data["parameters"]
    assert params["total"] == params["vision"] + params["adapter"] + params["language"] > 0
    names = {k["name"] for k in data["keys"]}
    assert "transformer.visual.attn_pool.kv_proj.weight" in names
    assert sum(1 for n in names if n.startswith("transformer.h.")) == 2 * 8  # 2 layers x 8 tensors


def test_info_of_the_full_preset_costs_no_memory_and_counts_9_6b():
    done = _qwenvl("model", "info", "qwen-vl-chat", "--json")
    assert done.returncode == 0, done.stderr
    params = json.loads(done.stdout)["parameters"]
    assert params["total"] == pytest.approx(9.6e9, rel=0.01)
    assert params["vision"] == pytest.approx(1.843e9, rel=0.01)
    assert params["adapter"] == pytest.approx(0.093e9, rel=0.02)
    assert params["language"] == pytest.approx(7.721e9, rel=0.01)


def test_table_output_and_user_errors_are_one_line(tmp_path):
    done = _qwenvl("model", "info", "qwen-vl-tiny")
    assert done.returncode == 0 and "adapter" in done.stdout and "language" in done.stdout
    bad = _qwenvl("model", "info", "qwen-vl-huge")
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error: unknown preset 'qwen-vl-huge'")
    assert "Traceback" not in bad.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    clash = _qwenvl("model", "init", "--preset", "qwen-vl-tiny", "--out", str(busy))
    assert clash.returncode == 1 and "not empty" in clash.stderr and "Traceback" not in clash.stderr
    wrong_dtype = _qwenvl("model", "init", "--preset", "qwen-vl-tiny", "--out", str(tmp_path / "n"), "--dtype", "int3")
    assert wrong_dtype.returncode == 1 and "--dtype" in wrong_dtype.stderr


def test_model_init_writes_the_shipped_pretrained_tiny_base(tmp_path):
    from qwenvl_core.models.shipped import shipped_dir

    out = tmp_path / "seeing"
    done = _qwenvl("model", "init", "--preset", "qwen-vl-tiny-seeing", "--out", str(out))
    assert done.returncode == 0, done.stderr
    for file in ("config.json", "model.safetensors", "qwen.tiktoken", "training_defaults.json"):
        assert (out / file).read_bytes() == (shipped_dir("qwen-vl-tiny-seeing") / file).read_bytes(), file
    reseeded = _qwenvl("model", "init", "--preset", "qwen-vl-tiny-seeing", "--out", str(tmp_path / "s"), "--seed", "3")
    assert reseeded.returncode == 1 and "--seed" in reseeded.stderr and "Traceback" not in reseeded.stderr
