"""An instance secrets loader for the tests: the env vars named in its config (Dagster's own
``EnvFileLoader`` looks for ``<base_dir>/.env/.env`` in 1.13, so it cannot serve here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import Field, Permissive
from dagster._core.secrets.loader import SecretsLoader
from dagster._serdes import ConfigurableClass, ConfigurableClassData


class StaticSecrets(SecretsLoader, ConfigurableClass):
    def __init__(self, inst_data: ConfigurableClassData | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self._inst_data = inst_data
        self._env = dict(env or {})

    def get_secrets_for_environment(self, location_name: str | None) -> Mapping[str, str]:
        return self._env

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {"env": Field(Permissive(), is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData,
                          config_value: Mapping[str, Any]) -> StaticSecrets:
        return cls(inst_data=inst_data, **config_value)
