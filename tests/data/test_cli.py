"""``qwenvl data validate`` / ``synth`` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from qwenvl_cli.data import app

runner = CliRunner()


def test_synth_then_validate_ok(tmp_path: Path, tiny_model_dir: Path):
    out = tmp_path / "ds"
    result = runner.invoke(app, ["synth", "--out", str(out), "--format", "openai", "--n", "12", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote 12 samples" in result.output and (out / "train.zip").is_file()
    result = runner.invoke(app, ["validate", str(out / "train.zip"), "--model", str(tiny_model_dir),
                                 "--tokens-per-second", "1000"])
    assert result.exit_code == 0, result.output
    assert "train.zip:train.jsonl (openai): OK" in result.output
    assert "supervised_tokens" in result.output and "estimated training time" in result.output


def test_validate_errors_exit_non_zero_with_located_messages(tmp_path: Path):
    path = tmp_path / "坏.jsonl"
    lines = ['{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]}',
             '{"messages": [{"role": "user", "content": "你好"}]}', "{oops"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert "坏.jsonl:2: messages: nothing to train on: no assistant message" in result.output
    assert "坏.jsonl:3: invalid JSON" in result.output
    assert "pass --model DIR" in result.output


def test_validate_json_report(tmp_path: Path, tiny_model_dir: Path):
    out = tmp_path / "ds"
    assert runner.invoke(app, ["synth", "--out", str(out), "--n", "10"]).exit_code == 0
    result = runner.invoke(app, ["validate", str(out / "train.json"), "--json", "--model", str(tiny_model_dir),
                                 "--max-length", "64", "--length-policy", "truncate", "--epochs", "2"])
    report = json.loads(result.output)
    assert result.exit_code == (0 if report["ok"] else 1)
    assert report["format"] == "qwen" and report["options"]["max_length"] == 64
    assert report["estimate"]["estimated_train_tokens"] == 2 * report["stats"]["total_tokens"]
    assert report["stats"]["max_length"] <= 64


def test_bad_flags_are_user_errors(tmp_path: Path):
    result = runner.invoke(app, ["validate", str(tmp_path / "x.jsonl"), "--max-length", "5"])
    assert result.exit_code != 0 and "--max-length needs --model" in str(result.exception)
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "o"), "--format", "llava"])
    assert result.exit_code != 0 and "--format" in str(result.exception)
