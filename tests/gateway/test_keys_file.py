"""``RAGLINE_KEYS_FILE``: API keys by their hashes in a file of their own (a Kubernetes Secret),
added to the config file's; every mistake is refused naming the file and what is wrong."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from gateway.config import Settings
from gateway.config_file import ConfigError, load_file_config

ONE = hashlib.sha256(b"rk-one").hexdigest()
TWO = hashlib.sha256(b"rk-two").hexdigest()


def settings(tmp: Path, keys: object, config: dict[str, object] | None = None) -> Settings:
    path = tmp / "keys.yaml"
    path.write_text(keys if isinstance(keys, str) else yaml.safe_dump(keys))
    document = config or {"models": [{"name": "smollm2"}]}
    (tmp / "config.yaml").write_text(yaml.safe_dump(document))
    return Settings(config=tmp / "config.yaml", keys_file=path, adapters_file=tmp / "a.json")


def test_keys_from_the_file_join_the_config_files(tmp_path: Path) -> None:
    config = {
        "models": [{"name": "smollm2"}],
        "keys": [{"id": "ops", "sha256": ONE, "admin": True}],
    }
    keys = {"keys": [{"id": "team-a", "sha256": TWO, "policy": {"rpm": 60, "team": "a"}}]}
    loaded = load_file_config(settings(tmp_path, keys, config))
    assert [(k.id, k.admin, k.policy.rpm) for k in loaded.keys] == [
        ("ops", True, None),
        ("team-a", False, 60),
    ]


@pytest.mark.parametrize(
    ("keys", "needle"),
    [
        ({"keys": [{"id": "ops", "sha256": "rk-one"}]}, "sha256"),  # a key where its hash belongs
        ({"keys": [{"id": "ops", "sha256": ONE, "rpm": 5}]}, "rpm"),  # misplaced policy field
        ({"keys": [{"id": "a", "sha256": ONE}, {"id": "b", "sha256": ONE}]}, "hashes repeat"),
        ({"keys": [{"id": "a", "sha256": ONE}, {"id": "a", "sha256": TWO}]}, "ids repeat"),
        ({"keys": [{"id": "a", "sha256": ONE, "policy": {"safety_policy": "strict"}}]}, "'strict'"),
        ({"models": []}, "models"),  # only `keys` belongs in this file
        ("keys: [", "not valid YAML"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_it(tmp_path: Path, keys: object, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_file_config(settings(tmp_path, keys))
    assert "keys.yaml" in str(err.value) and needle in str(err.value)


def test_a_missing_keys_file_is_an_error_not_an_open_gateway(tmp_path: Path) -> None:
    s = settings(tmp_path, {"keys": []})
    s.keys_file = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError, match="cannot read keys file"):
        load_file_config(s)
