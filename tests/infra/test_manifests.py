"""Deployment files in ``infra/`` and docs/configuration.md against the code: every YAML parses, every
``QWENVL_*`` variable they set is a ``Settings`` field, the platform containers set only documented variables,
the configuration table matches ``Settings`` exactly, Serve configs validate against Ray Serve's own schema and
import a real application builder, and the Dockerfiles copy files that exist."""

from __future__ import annotations

import configparser
import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from qwenvl_core.secret_names import looks_secret
from tests.infra.isolated import run_python
from tests.infra.settings_table import READER, settings_rows, valid_env_names

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
PROJECT_PACKAGES = ("qwenvl_core.", "service.", "workflows.", "qwenvl_cli.")
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"})
DOCKERFILES = sorted((INFRA / "docker").glob("Dockerfile.*"))
SECRETS = INFRA / "k8s" / "secrets"


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


def _env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of an env file (comments and blank lines skipped)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


def test_the_environment_of_platform_containers_is_documented():
    """The ConfigMap and Secrets the Ray pods and MLflow load and the compose services running the platform image
    set only variables of the configuration table."""
    documented = set(_table())
    config = [d for path, d in _all_documents() if path.parent.name == "k8s" and d["kind"] == "ConfigMap"
              and d["metadata"]["name"] == "qwenvl-config"]
    assert len(config) == 1
    compose = yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())["services"]
    platform_services = [s for s in compose.values() if str(s.get("image", "")).startswith("qwenvl-platform")]
    assert len(platform_services) == 2
    names = set(_env_names(config[0]["data"]))
    names |= {n for secret in ("qwenvl.env.example", "mlflow.env.example") for n in _env_file(SECRETS / secret)}
    names |= {n for service in platform_services for n in service["environment"]}
    assert {"QWENVL_ADMIN_KEY", "AWS_SECRET_ACCESS_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"} <= names
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


def test_mlflow_server_is_tenant_scoped_read_only_and_reachable_by_service_name():
    from service.mlflow_tenants import AUTHORIZATION_FUNCTION

    docs = [d for _, d in _all_documents() if d.get("metadata", {}).get("name", "").startswith("mlflow")]
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name=basic-auth" in container["args"]
    hosts = next(a for a in container["args"] if a.startswith("--allowed-hosts="))
    assert "mlflow:*" in hosts.split("=", 1)[1].split(",")
    for ini in (SECRETS / "mlflow-basic-auth.ini.example", INFRA / "compose" / "mlflow-auth.ini"):
        parser = configparser.ConfigParser()
        parser.read(ini)
        assert parser["mlflow"]["default_permission"] == "NO_PERMISSIONS", ini
        assert parser["mlflow"]["authorization_function"] == AUTHORIZATION_FUNCTION, ini  # tenants read-only
    module, function = AUTHORIZATION_FUNCTION.split(":")
    assert callable(getattr(importlib.import_module(module), function))


# ----- deployment defaults: secrets, images, users, network exposure ------------------------------------------------
def _k8s_objects() -> list[Any]:
    return [doc for path, doc in _all_documents() if path.parent.name == "k8s" and path.name != "kustomization.yaml"]


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod template in the manifests, the RayService's head and worker groups included."""
    for doc in _k8s_objects():
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield name, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            yield f"{name}/head", cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster["workerGroupSpecs"]:
                yield f"{name}/{group['groupName']}", group["template"]["spec"]


def _images() -> Iterator[tuple[str, str]]:
    for where, pod in _pod_specs():
        for container in pod["containers"]:
            yield where, container["image"]
    compose = yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())["services"]
    for name, service in compose.items():
        yield f"compose/{name}", service["image"]
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        for base in re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE):
            if base.startswith("${"):  # FROM ${ARG}: the ARG's default
                base = re.search(r"^ARG\s+" + base[2:-1] + r"=(\S+)", text, flags=re.MULTILINE).group(1)
            yield dockerfile.name, base


def test_every_image_is_pinned():
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), flags=re.MULTILINE).group(1)
    images = list(_images())
    assert len(images) >= 10
    for where, image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"{where}: {image} is not pinned to a tag"
        assert re.search(r"\d", tag), f"{where}: {image}: the tag names no version"
        if name == "qwenvl-platform":
            assert tag.startswith(f"{version}-"), f"{where}: {image} is not this release ({version})"


def test_nothing_runs_as_root():
    for dockerfile in DOCKERFILES:
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), flags=re.MULTILINE)
        assert users and users[-1].split(":")[0] not in {"root", "0"}, f"{dockerfile.name}: runs as root"
    pods = list(_pod_specs())
    assert len(pods) == 7  # mlflow, postgres, minio, minio-buckets, ray head + cpu + gpu
    for where, pod in pods:
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) > 0, where
        for container in pod["containers"]:
            own = container.get("securityContext", {})
            assert own.get("runAsUser", 1) != 0 and own.get("runAsNonRoot", True) is True, where
            if pod.get("restartPolicy") != "OnFailure":  # long-running containers: no privilege escalation
                assert own.get("allowPrivilegeEscalation") is False, where
    compose = yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())["services"]
    for name, service in compose.items():
        assert str(service.get("user", "")).split(":")[0] not in {"root", "0"}, name


def test_compose_publishes_only_the_api_on_public_interfaces():
    compose = yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())
    public = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            parts = str(port).split(":")
            if len(parts) < 3 or parts[0] not in {"127.0.0.1", "::1", "[::1]"}:
                public.append((name, str(port)))
    assert public == [("qwenvl", "8000:8000")]  # the API; the dashboard, MLflow, MinIO: loopback or not at all
    assert compose["networks"]["backend"]["internal"] is True
    for name in ("postgres", "minio", "minio-buckets"):
        service = compose["services"][name]
        assert service["networks"] == ["backend"] and "ports" not in service, name


def _rules(policy: dict[str, Any]) -> list[dict[str, Any]]:
    return list(policy["spec"].get("ingress") or [])


def test_network_policy_keeps_everything_but_the_api_internal():
    policies = [d for d in _k8s_objects() if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not _rules(p)]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"], "no default deny of ingress"
    ray_pods = {"matchExpressions": [{"key": "ray.io/node-type", "operator": "Exists"}]}
    open_to_all, from_other_namespaces = [], []
    for policy in policies:
        for rule in _rules(policy):
            ports = sorted(p["port"] for p in rule.get("ports", []))
            if not rule.get("from"):
                open_to_all.append((policy["spec"]["podSelector"], ports))
            for peer in rule.get("from", []):
                assert "ipBlock" not in peer, policy["metadata"]["name"]
                if "namespaceSelector" in peer:
                    from_other_namespaces.append((policy["spec"]["podSelector"], peer.get("podSelector"), ports))
    assert open_to_all == [(ray_pods, [8000])]  # only the API is reachable from anywhere
    assert from_other_namespaces == [({"matchLabels": {"ray.io/node-type": "head"}},
                                      {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}, [8265])]
    selected = {json.dumps(p["spec"]["podSelector"], sort_keys=True) for p in policies}
    for app in ("postgres", "minio", "mlflow"):  # each internal service admits only named pods, on its port
        assert json.dumps({"matchLabels": {"app": app}}, sort_keys=True) in selected, app


def test_no_secret_is_shipped_and_every_one_is_required():
    from service.settings import PLACEHOLDER_WORDS, is_placeholder

    # k8s: no Secret object in the manifests; each one is generated from a file the operator writes
    assert not [d for d in _k8s_objects() if d["kind"] == "Secret"]
    kustomization = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())
    generated = {g["name"] for g in kustomization["secretGenerator"]}
    referenced = {ref["secretRef"]["name"] for _, pod in _pod_specs() for c in pod["containers"]
                  for ref in c.get("envFrom", []) if "secretRef" in ref}
    referenced |= {v["secret"]["secretName"] for _, pod in _pod_specs() for v in pod.get("volumes", [])
                   if "secret" in v}
    assert referenced == generated
    for generator in kustomization["secretGenerator"]:
        for source in generator.get("envs", []) + [f.split("=", 1)[-1] for f in generator.get("files", [])]:
            example = INFRA / "k8s" / (source + ".example")
            assert example.is_file(), f"{source}: no example to copy"
            assert not (INFRA / "k8s" / source).exists(), f"{source}: a real secret file is in the repository"
            if source.endswith(".env"):
                for name, value in _env_file(example).items():
                    if looks_secret(name) or name.endswith("_URI"):
                        assert value == "", f"{example.name}: {name} ships a value"
    # compose: every secret is required (no default); the example leaves them all empty
    compose_text = (INFRA / "compose" / "docker-compose.yml").read_text()
    uses = re.findall(r"\$\{([A-Z][A-Z0-9_]*)(:?[-?]?)", compose_text)
    assert uses
    for name, operator in uses:
        if looks_secret(name):
            assert operator == ":?", f"docker-compose.yml: ${{{name}}} must be required (:?), not defaulted"
    example_env = _env_file(INFRA / "compose" / "example.env")
    secrets_in_example = [n for n in example_env if looks_secret(n)]
    assert len(secrets_in_example) == 6 and all(example_env[n] == "" for n in secrets_in_example)
    # no placeholder value anywhere in infra/
    placeholders = [w for w in PLACEHOLDER_WORDS if w != "placeholder"]
    assert is_placeholder(placeholders[0])
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix != ".md"):
        found = [w for w in placeholders if w in path.read_text().lower()]
        assert not found, f"{path.relative_to(INFRA)}: placeholder {found}"


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
