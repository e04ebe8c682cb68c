"""Bad flag values and unreadable inputs through the console command's entry point (no stack): each
is one ``error:`` line naming the flag or file and exit status 1, never a traceback; what a terminal cannot encode
is printed escaped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import entry_point

QWENVL = str(Path(sys.executable).parent / "qwenvl")  # the console script of this environment
REMOTE = ("--base-url", "http://127.0.0.1:9", "--api-key", "sk-test")  # nothing listens: refused before any call


def _qwenvl(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The console script in a subprocess when the test sets its environment or directory; otherwise its entry point
    in this process (``entry_point``)."""
    if env is not None or cwd is not None:
        return subprocess.run([QWENVL, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd,
                              errors="backslashreplace")
    return entry_point(*args)


def _one_line_error(done: subprocess.CompletedProcess[str], *says: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for text in says:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize(("flag", "value"), [("--learning-rate-multiplier", "nan"), ("--lora-alpha", "inf")])
def test_jobs_create_refuses_non_finite_numbers_naming_the_flag(flag, value):
    _one_line_error(_qwenvl("jobs", "create", "-m", "qwen-vl-tiny", "-t", "file-x", flag, value, *REMOTE),
                    flag, "finite")


@pytest.mark.parametrize("extra", ['{"lora": {"alpha": Infinity}}', '{"x": 1e999}'])
def test_jobs_create_refuses_non_finite_numbers_in_extra(extra):
    _one_line_error(_qwenvl("jobs", "create", "-m", "qwen-vl-tiny", "-t", "file-x", "--extra", extra, *REMOTE),
                    "--extra")


def test_chat_refuses_a_non_finite_temperature():
    _one_line_error(_qwenvl("chat", "qwen-vl-tiny", "hi", "--temperature", "nan", *REMOTE), "--temperature")


def test_an_invalid_base_url_or_request_url_is_one_line():
    _one_line_error(_qwenvl("jobs", "list", "--base-url", "http://[::1", "--api-key", "sk-test"),
                    "http://[::1", "--base-url")
    _one_line_error(_qwenvl("jobs", "show", "ftjob-\x01", *REMOTE), "not a valid URL")


def test_a_key_that_cannot_travel_in_a_header_is_one_line():
    _one_line_error(_qwenvl("jobs", "list", "--base-url", "http://127.0.0.1:9", "--api-key", "clé"), "--api-key")


def test_model_init_refuses_a_seed_torch_cannot_take(tmp_path):
    _one_line_error(_qwenvl("model", "init", "--preset", "qwen-vl-tiny", "--out", str(tmp_path / "m"),
                            "--seed", str(2**64)), "--seed")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("size", ["0", "8"])
def test_data_synth_refuses_an_image_size_it_cannot_draw(tmp_path, size):
    _one_line_error(_qwenvl("data", "synth", "--out", str(tmp_path / "s"), "--n", "2", "--image-size", size),
                    "--image-size")
    assert not (tmp_path / "s").exists()


def test_data_synth_refuses_an_output_that_is_a_file_or_under_one(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    _one_line_error(_qwenvl("data", "synth", "--out", str(file), "--n", "2"), str(file), "not a directory")
    _one_line_error(_qwenvl("data", "synth", "--out", str(file / "sub"), "--n", "2"), "--out")
    assert file.read_text() == "x"


def test_finetune_config_that_is_not_utf8_or_has_a_section_the_flags_cannot_fill(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("")
    common = ("finetune", "--base", str(tmp_path / "base"), "--train", str(train), "--out", str(tmp_path / "run"))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"lora:\n\xff\xfe r: 8\n")
    _one_line_error(_qwenvl(*common, "--config", str(binary)), "--config", "UTF-8")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("lora: 5\n")
    _one_line_error(_qwenvl(*common, "--config", str(scalar), "--rank", "8"), "--config", "lora", "--rank")


def test_data_validate_prints_names_the_terminal_cannot_encode(tmp_path):
    """A file name with an undecodable byte reaches Python as a lone surrogate; with a strict UTF-8 stdout (a
    UTF-8 locale) the report, its JSON and the error line print it escaped instead of failing."""
    record = {"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    (tmp_path / os.fsdecode(b"ok\xff.jsonl")).write_text(json.dumps(record) + "\n")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # strict, unlike the C locale's surrogateescape
    name = os.fsdecode(b"ok\xff.jsonl")
    report = _qwenvl("data", "validate", name, env=env, cwd=tmp_path)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr
    assert report.stdout.startswith("ok\\udcff.jsonl (openai): OK"), report.stdout
    as_json = _qwenvl("data", "validate", name, "--json", env=env, cwd=tmp_path)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["file"] == name, as_json.stderr
    missing = _qwenvl("files", "upload", os.fsdecode(b"nope\xff.jsonl"), *REMOTE, env=env, cwd=tmp_path)
    _one_line_error(missing, "nope\\udcff.jsonl: no such file")
