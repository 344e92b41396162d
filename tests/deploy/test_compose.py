"""deploy/compose.yaml, parsed by a Compose-spec parser (``compose-spec``, bindings of the Rust
``compose_spec`` crate) after Compose's own variable interpolation, then checked for what makes
the stack start in order and fit together: services, healthchecks, depends_on, volumes, every file
it mounts, every setting the gateway reads, the proxy, Prometheus and Grafana wiring."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose

from gateway.config import Settings
from gateway.config_file import load_file_config
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
REQUIRED = {"RAGLINE_ADMIN_KEY": "rk-admin", "POSTGRES_PASSWORD": "pw", "GRAFANA_PASSWORD": "gp"}


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}``."""

    def value(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in env and (env[name] or ":" not in op):
            return env[name]
        if op.endswith("?"):
            raise MissingVariable(f"{name}: {arg}")
        return arg

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", value, text)


def load(env: dict[str, str] | None = None) -> dict[str, Any]:
    text = interpolate(COMPOSE.read_text(), REQUIRED if env is None else env)
    return PyCompose.from_yaml(text).to_dict()  # raises ValueError on anything off-spec


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load()


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    """A service with ``extends`` (same file) applied as Compose merges it."""
    svc = dict(compose["services"][name])
    base_name = svc.pop("extends", {}).get("service")
    if base_name is None:
        return svc
    base = service(compose, base_name)
    volumes = {v.split(":")[1]: v for v in base.get("volumes", [])}
    volumes.update({v.split(":")[1]: v for v in svc.pop("volumes", [])})
    return {**base, **svc, "volumes": list(volumes.values())}


def test_the_parser_refuses_what_compose_would(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        PyCompose.from_yaml(
            "services:\n  a:\n    image: x\n    depends_on: {b: {condition: maybe}}\n"
        )
    with pytest.raises(MissingVariable, match="RAGLINE_ADMIN_KEY"):
        load({})  # secrets are asked for, never defaulted


def test_the_stack(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "gateway-1",
        "gateway-2",
        "proxy",
        "redis",
        "postgres",
        "vllm",
        "vllm-cpu",
        "prometheus",
        "grafana",
    }
    # vLLM on a GPU or on the CPU: one profile each, both answering as the same name
    assert service(compose, "vllm")["profiles"] == ["gpu"]
    assert service(compose, "vllm-cpu")["profiles"] == ["cpu"]
    gpu = service(compose, "vllm")["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    aliases = [service(compose, n)["networks"]["default"]["aliases"] for n in ("vllm", "vllm-cpu")]
    assert aliases[0] == aliases[1] == ["vllm-server"]


def test_every_service_has_a_healthcheck_and_starts_after_what_it_needs(
    compose: dict[str, Any],
) -> None:
    names = set(compose["services"])
    for name in names:
        svc = service(compose, name)
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1, name
        for other, condition in svc.get("depends_on", {}).items():
            assert other in names, (name, other)
            assert condition["condition"] in ("service_healthy", "service_started")
    for gateway in ("gateway-1", "gateway-2"):
        needs = service(compose, gateway)["depends_on"]
        assert needs == {
            "redis": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
        }
        assert "/ready" in " ".join(service(compose, gateway)["healthcheck"]["test"])
    proxy = service(compose, "proxy")["depends_on"]
    assert {k: v["condition"] for k, v in proxy.items()} == {
        "gateway-1": "service_healthy",
        "gateway-2": "service_healthy",
    }


def test_volumes_are_declared_shared_and_mounted_files_exist(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used: set[str] = set()
    for name in compose["services"]:
        for volume in service(compose, name).get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} is missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
            assert target.startswith("/")
    assert used == declared
    # both gateways share stores and adapters, each keeps its own usage spool
    mounts = [
        dict(reversed(v.split(":")[:2]) for v in service(compose, g)["volumes"])
        for g in ("gateway-1", "gateway-2")
    ]
    assert mounts[0]["/data"] == mounts[1]["/data"] == "ragline-data"
    assert mounts[0]["/spool"] != mounts[1]["/spool"]


def test_the_gateways_settings_are_settings_it_reads(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    env = service(compose, "gateway-1")["environment"]
    fields = {f"RAGLINE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    settings = Settings(**{k.removeprefix("RAGLINE_").lower(): v for k, v in env.items()})
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.database_url and "@postgres:5432/" in settings.database_url
    assert settings.admin_key == REQUIRED["RAGLINE_ADMIN_KEY"]
    grace = service(compose, "gateway-1")["stop_grace_period"]
    assert _seconds(grace) > settings.shutdown_grace
    # the config file it mounts is one the gateway accepts, its model served by vllm-server
    mount = next(v for v in env_mounts(compose) if v[1] == str(settings.config))
    config = load_file_config(Settings(config=DEPLOY / mount[0], adapters_file=tmp_path / "a.json"))
    assert [u for m in config.models for u in m.upstreams] == ["http://vllm-server:8000"]


def env_mounts(compose: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(v.split(":")[:2]) for v in service(compose, "gateway-1")["volumes"]]  # type: ignore[misc]


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def test_the_proxy_balances_both_gateways_without_buffering_streams() -> None:
    nginx = (DEPLOY / "compose" / "nginx.conf").read_text()
    servers = re.findall(r"^\s*server\s+([\w-]+):(\d+)", nginx, re.M)
    assert servers == [("gateway-1", "8000"), ("gateway-2", "8000")]
    assert "proxy_buffering off;" in nginx  # server-sent events reach the client as they come
    # a request is retried elsewhere only when it never reached a gateway
    assert re.search(r"proxy_next_upstream error timeout;", nginx)
    assert "non_idempotent" not in nginx


def test_prometheus_scrapes_both_gateways_with_the_alert_rules(compose: dict[str, Any]) -> None:
    svc = service(compose, "prometheus")
    mounts = dict(tuple(v.split(":")[:2]) for v in svc["volumes"])  # type: ignore[misc]
    config = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    rules = config["rule_files"]
    assert rules == ["/etc/prometheus/alerts.yml"]
    assert mounts["./prometheus/alerts.yml"] == rules[0]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "ragline"]
    assert job["static_configs"][0]["targets"] == ["gateway-1:8000", "gateway-2:8000"]
    # /metrics needs a key: the one Compose hands Prometheus as a secret
    secret = job["authorization"]["credentials_file"]
    assert secret == f"/run/secrets/{svc['secrets'][0]}"
    assert compose["secrets"][svc["secrets"][0]] == {"environment": "RAGLINE_ADMIN_KEY"}


def test_grafana_loads_the_shipped_dashboard(compose: dict[str, Any]) -> None:
    mounts = dict(tuple(v.split(":")[:2]) for v in service(compose, "grafana")["volumes"])  # type: ignore[misc]
    assert mounts["./grafana/ragline.json"].startswith("/var/lib/grafana/dashboards/")
    providers = yaml.safe_load((DEPLOY / "compose" / "grafana" / "dashboards.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    sources = yaml.safe_load((DEPLOY / "compose" / "grafana" / "datasources.yaml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    dashboard = json.loads((DEPLOY / "grafana" / "ragline.json").read_text())
    [variable] = dashboard["templating"]["list"]
    assert (
        variable["type"] == "datasource" and variable["query"] == sources["datasources"][0]["type"]
    )
    assert sources["datasources"][0]["isDefault"] is True
