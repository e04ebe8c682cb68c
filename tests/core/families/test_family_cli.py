"""``qwenvl model init|info`` for the transformers-native families (console script and in-process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenvl_cli.main import app
from qwenvl_core.errors import ConfigError


def _qwenvl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "qwenvl")  # the console script of this environment
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def test_console_script_inits_a_qwen2_5_vl_tiny_directory_that_info_describes(tmp_path):
    out = tmp_path / "q25"
    done = _qwenvl("model", "init", "--preset", "qwen2.5-vl-tiny", "--out", str(out), "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert {"config.json", "tokenizer.json", "chat_template.json", "preprocessor_config.json"} <= {
        p.name for p in out.iterdir()
    }
    info = CliRunner().invoke(app, ["model", "info", str(out), "--json", "--keys"])  # in-process: one start is enough
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["family"] == "qwen2.5-vl"
    params = data["parameters"]
    assert params["total"] == params["vision"] + params["adapter"] + params["language"]
    assert min(params["vision"], params["adapter"], params["language"]) > 0
    names = {k["name"] for k in data["keys"]}
    assert "model.visual.merger.mlp.0.weight" in names and "model.language_model.embed_tokens.weight" in names


@pytest.mark.parametrize("preset", ["qwen2-vl-tiny", "qwen3-vl-tiny"])
def test_init_then_info_in_process(tmp_path, preset):
    runner = CliRunner()
    out = tmp_path / preset
    done = runner.invoke(app, ["model", "init", "--preset", preset, "--out", str(out)])
    assert done.exit_code == 0, done.output
    info = runner.invoke(app, ["model", "info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["family"] == preset.removesuffix("-tiny")
    assert data["config"]["model_type"] == preset.removesuffix("-tiny").replace("-", "_")
    again = runner.invoke(app, ["model", "init", "--preset", preset, "--out", str(out)])
    assert isinstance(again.exception, ConfigError) and "not empty" in str(again.exception)


def test_info_of_full_size_presets_counts_tied_weights_once():
    runner = CliRunner()
    tied = json.loads(runner.invoke(app, ["model", "info", "qwen2-vl-2b", "--json"]).stdout)["parameters"]
    assert tied["total"] == pytest.approx(2.21e9, rel=0.01)  # 2.44B if the tied LM head were counted again
    table = runner.invoke(app, ["model", "info", "qwen3-vl-8b"])
    assert table.exit_code == 0 and "adapter" in table.stdout and "8,767,123,696" in table.stdout
