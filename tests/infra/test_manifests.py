"""Deployment files in ``infra/`` and docs/configuration.md against the code: every YAML parses, every
``QWENVL_*`` variable they set is a ``Settings`` field, the platform containers set only documented variables,
the configuration table matches ``Settings`` exactly, Serve configs validate against Ray Serve's own schema and
import a real application builder, and the Dockerfiles copy files that exist."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.isolated import run_python
from tests.infra.settings_table import READER, settings_rows, valid_env_names

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
PROJECT_PACKAGES = ("qwenvl_core.", "service.", "workflows.")
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"})
DOCKERFILES = sorted((INFRA / "docker").glob("Dockerfile.*"))


def _documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _all_documents() -> Iterator[tuple[Path, Any]]:
    for path in YAML_FILES:
        for doc in _documents(path):
            yield path, doc


def _env_names(node: Any) -> Iterator[str]:
    """Environment variable names anywhere in a document: mapping keys (ConfigMap/Secret data, compose
    ``environment``) and ``{name: ..., value...}`` entries of container ``env`` lists."""
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and ("value" in node or "valueFrom" in node):
            yield node["name"]
        for key, value in node.items():
            if isinstance(key, str) and re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
                yield key
            yield from _env_names(value)
    elif isinstance(node, list):
        for item in node:
            yield from _env_names(item)


def _table() -> dict[str, tuple[str, str, str]]:
    """docs/configuration.md's table: variable -> (read by, default, meaning)."""
    rows: dict[str, tuple[str, str, str]] = {}
    for line in CONFIG_DOC.read_text().splitlines():
        match = re.fullmatch(r"\| `([A-Z][A-Z0-9_]*)` \| (.*?) \| (.*?) \| (.*) \|", line)
        if match:
            name, reader, default, meaning = match.groups()
            assert name not in rows, f"{name} is documented twice"
            rows[name] = (reader, default, meaning)
    return rows


def test_infra_has_the_expected_files():
    names = {p.relative_to(INFRA).as_posix() for p in YAML_FILES}
    assert {"compose/docker-compose.yml", "k8s/rayservice.yaml", "k8s/mlflow.yaml", "k8s/postgres.yaml",
            "k8s/minio.yaml", "k8s/platform-config.yaml"} <= names
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_every_yaml_parses(path: Path):
    docs = _documents(path)
    assert docs, f"{path} has no document"
    if path.parent.name == "k8s" and path.name != "kustomization.yaml":
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a Kubernetes object: {doc}"
            assert doc["kind"] == "Namespace" or doc["metadata"].get("namespace") == "qwenvl"


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in (INFRA / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_every_qwenvl_variable_set_in_infra_is_a_settings_field():
    valid = valid_env_names()
    set_somewhere = {(path.relative_to(INFRA).as_posix(), name) for path, doc in _all_documents()
                     for name in _env_names(doc) if name.startswith("QWENVL_")}
    assert len(set_somewhere) > 20  # the walk does find the variables (k8s and compose)
    unknown = sorted(f"{where}: {name}" for where, name in set_somewhere if name not in valid)
    assert not unknown, f"not Settings fields: {unknown}"


def test_the_environment_of_platform_containers_is_documented():
    """The ConfigMap/Secret the Ray pods load and the compose services running the platform image set only
    variables of the configuration table."""
    documented = set(_table())
    k8s = [doc for path, doc in _all_documents() if path.parent.name == "k8s"]
    platform_objects = [d for d in k8s if d["kind"] in {"ConfigMap", "Secret"}
                        and d["metadata"]["name"] in {"qwenvl-config", "qwenvl-secrets", "mlflow-secrets"}]
    assert len(platform_objects) == 3
    compose = yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())["services"]
    platform_services = [s for s in compose.values() if str(s.get("image", "")).startswith("qwenvl-platform")]
    assert len(platform_services) == 2
    names = {n for obj in platform_objects for n in _env_names(obj.get("data", {}) | obj.get("stringData", {}))}
    names |= {n for service in platform_services for n in service["environment"]}
    assert sorted(names - documented) == []


def test_configuration_table_matches_the_settings_class():
    table = _table()
    expected = settings_rows()
    documented = {name: row for name, row in table.items() if row[0] == READER}
    assert sorted(documented) == sorted(expected), "regenerate with: python -m tests.infra.settings_table"
    for name, (default, meaning) in expected.items():
        assert documented[name][1:] == (default, meaning), name
    stray = sorted(n for n, row in table.items() if n.startswith("QWENVL_") and n not in expected)
    for name in stray:  # QWENVL_* variables read outside Settings must say which module reads them
        assert table[name][0].startswith(PROJECT_PACKAGES), name


def test_variables_said_to_be_read_by_project_modules_appear_in_them():
    for name, (reader, _, _) in _table().items():
        if reader == READER:
            continue  # checked against the Settings class itself
        modules = [m.strip() for m in reader.split(",") if m.strip().startswith(PROJECT_PACKAGES)]
        for module in modules:
            source = ROOT / (module.replace(".", "/") + ".py")
            assert source.is_file(), f"{name}: no module {module}"
            assert name in source.read_text(), f"{name} is not read in {module}"


def _serve_configs() -> list[tuple[str, dict[str, Any]]]:
    rayservice = next(d for _, d in _all_documents() if d.get("kind") == "RayService")
    compose = yaml.safe_load((INFRA / "compose" / "serve-config.yaml").read_text())
    return [("rayservice", yaml.safe_load(rayservice["spec"]["serveConfigV2"])), ("compose", compose)]


_VALIDATE_SERVE = """
import importlib, json, sys
from ray.serve.schema import ServeDeploySchema
from workflows.serve_app import APP_NAME
out = []
for config in json.load(sys.stdin):
    schema = ServeDeploySchema.model_validate(config)
    module, attr = schema.applications[0].import_path.split(":")
    out.append({"apps": [a.name for a in schema.applications], "app_name": APP_NAME,
                "host": schema.http_options.host,
                "builder_callable": callable(getattr(importlib.import_module(module), attr))})
print(json.dumps(out))
"""


def test_serve_configs_validate_and_import_the_application_builder():
    """Both Serve configs validate against Ray Serve's own schema and import the real application builder."""
    configs = _serve_configs()
    results = run_python(_VALIDATE_SERVE, [config for _, config in configs])
    assert len(results) == len(configs) == 2
    for (where, _), result in zip(configs, results, strict=True):
        assert result["apps"] == [result["app_name"]], f"{where}: ServeBackend looks deployments up by APP_NAME"
        assert result["builder_callable"], where
        assert result["host"] == "0.0.0.0", where


def test_rayservice_has_cpu_and_autoscaled_gpu_worker_groups():
    rayservice = next(d for _, d in _all_documents() if d.get("kind") == "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] >= 1
    head_url = next(d for _, d in _all_documents() if d.get("kind") == "ConfigMap"
                    and d["metadata"]["name"] == "qwenvl-config")["data"]["QWENVL_RAY_ADDRESS"]
    assert head_url.startswith(f"http://{rayservice['metadata']['name']}-head-svc.") and head_url.endswith(":8265")


def test_mlflow_server_is_tenant_scoped_and_reachable_by_service_name():
    docs = [d for _, d in _all_documents() if d.get("metadata", {}).get("name", "").startswith("mlflow")]
    ini = next(d for d in docs if d["kind"] == "Secret" and "basic_auth.ini" in d["stringData"])
    assert "default_permission = NO_PERMISSIONS" in ini["stringData"]["basic_auth.ini"]
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name=basic-auth" in container["args"]
    hosts = next(a for a in container["args"] if a.startswith("--allowed-hosts="))
    assert "mlflow:*" in hosts.split("=", 1)[1].split(",")
    compose_ini = (INFRA / "compose" / "mlflow-auth.ini").read_text()
    assert "default_permission = NO_PERMISSIONS" in compose_ini


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_copy_files_that_exist(dockerfile: Path):
    text = dockerfile.read_text()
    copies = re.findall(r"^COPY\s+(.+)$", text, flags=re.MULTILINE)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such file"
    assert re.search(r'pip install "torch==\$\{TORCH_VERSION\}" --index-url "\$\{TORCH_INDEX_URL\}"', text)
    assert "-c /app/torch-constraint.txt" in text
    assert "ARG TORCH_VERSION=2.13.0" in text
    makefile = (ROOT / "Makefile").read_text()
    assert "TORCH_VERSION ?= 2.13.0" in makefile and "TORCH_INDEX_URL" in makefile


def test_dockerignore_keeps_what_the_dockerfiles_copy():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for dockerfile in DOCKERFILES:
        for line in re.findall(r"^COPY\s+(.+)$", dockerfile.read_text(), flags=re.MULTILINE):
            assert not set(line.split()[:-1]) & ignored
