"""What a run works with, opened once at start: the control tables (checkpoints, DLQ, ledger,
topic identities, snapshot bounds, requests, pauses), the batch applier with its replica
catalog, the replica rebuilds and the read models. Every table is created if missing, retrying
while ClickHouse is away.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from confluent_kafka.admin import AdminClient

from projector import kafka
from projector.clickhouse import ClickHouse
from projector.commit.checkpoint import PROJECTION, BatchCommitter, CheckpointStore
from projector.commit.dead_letters import DeadLetterStore
from projector.commit.ledger import TransactionLedger
from projector.config import ProjectorConfig
from projector.operations.pauses import TablePauses
from projector.operations.replica_rebuild import ReplicaRebuilds
from projector.operations.requests import OpsRequests
from projector.read_models.definitions import ReadModel, load_read_models
from projector.read_models.stage import ReadModelStage, stage_for
from projector.replicas.analyst_views import AnalystViews
from projector.replicas.apply import BatchApplier
from projector.replicas.catalog import ReplicaCatalog
from projector.replicas.fast_path import FastPath
from projector.replicas.signal_table import SignalTable
from projector.replicas.snapshot_sweep import SnapshotSweep
from projector.replicas.source_tables import SourceReplicas
from projector.replicas.topic_guard import TopicGuard, TopicShape
from projector.run.retries import with_retries
from schemas.registry import SchemaCache
from schemas.upcasters import Upcasters


@dataclass
class RunParts:
    ch: ClickHouse  # fenced: everything a batch writes goes through it (checkpoint.py, step 3)
    schemas: SchemaCache
    checkpoints: CheckpointStore
    committer: BatchCommitter
    dlq: DeadLetterStore
    ledger: TransactionLedger
    guard: TopicGuard
    applier: BatchApplier
    replica_rebuilds: ReplicaRebuilds
    # The read models' stage (projector/read_models/stage.py): one process, the lease holder,
    # maintains them; a member with `maintain_read_models = false` never takes the lease.
    stage: ReadModelStage
    read_model_list: list[ReadModel]
    requests: OpsRequests  # rebuilds and rollbacks, asked through a control table
    pauses: TablePauses
    source_replicas: SourceReplicas  # replicas of captured tables that never changed


def open_parts(config: ProjectorConfig, ch: ClickHouse, admin: AdminClient) -> RunParts:
    schemas = SchemaCache(config.registry_url)
    checkpoints = CheckpointStore(ch, config.control_database, PROJECTION)
    with_retries(checkpoints.create, "creating the checkpoint table")
    committer = BatchCommitter(checkpoints)
    has_fast_path = hasattr(ch, "over_avro")
    stage = stage_for(config, ch, checkpoints, committer.member)  # fenced by its lease
    with_retries(stage.create, "creating the read models' stage tables")
    ch = committer.fenced(ch)
    control = config.control_database
    dlq = DeadLetterStore(ch, control, PROJECTION)
    with_retries(dlq.create, "creating the DLQ table")
    ledger = TransactionLedger(ch, control, PROJECTION)
    with_retries(ledger.create, "creating the transaction ledger")
    guard = TopicGuard(ch, control, PROJECTION, partial(_topic_shape, admin))
    with_retries(guard.create, "creating the topic identities")
    sweep = SnapshotSweep(ch, control, PROJECTION, guard.partition_count)
    with_retries(sweep.create, "creating the snapshot bounds")
    fast_path = None
    if config.fast_path and has_fast_path:
        fast_path = FastPath(ch, config.registry_url, config.transaction_metadata)
    upcasters = Upcasters.load(config.upcasters_file)
    views = AnalystViews(
        ch, config.analyst_view_prefix, {config.control_database, config.read_model_database}
    )
    catalog = ReplicaCatalog(
        ch,
        config.replica_prefix,
        SignalTable(config.source_dsn, config.publication).request,
        views,
        config.delete_policy,
        config.history_prefix,
    )
    applier = BatchApplier(
        ch, schemas, catalog, PROJECTION, upcasters=upcasters, fast_path=fast_path, sweep=sweep
    )
    # Replica tables rebuilt from Kafka or a snapshot (projector/operations/replica_rebuild.py).
    replica_rebuilds = ReplicaRebuilds.for_config(
        config, ch, schemas, upcasters, guard.partition_count
    )
    with_retries(replica_rebuilds.create, "creating the replica rebuild table")
    requests = OpsRequests(ch, control)
    with_retries(requests.create, "creating the ops request table")
    pauses = TablePauses(ch, control)
    with_retries(pauses.create, "creating the table pause tables")
    return RunParts(
        ch=ch,
        schemas=schemas,
        checkpoints=checkpoints,
        committer=committer,
        dlq=dlq,
        ledger=ledger,
        guard=guard,
        applier=applier,
        replica_rebuilds=replica_rebuilds,
        stage=stage,
        read_model_list=load_read_models(config.read_models_file),
        requests=requests,
        pauses=pauses,
        source_replicas=SourceReplicas(
            config.source_dsn,
            config.publication,
            config.schemas,
            config.table_pattern,
            catalog,
            upcasters,
            partial(kafka.table_topic, config.topic_prefix),
            partial(kafka.topic_names, admin),
        ),
    )


def _topic_shape(admin: AdminClient, topic: str) -> TopicShape | None:
    described = kafka.describe_topic(admin, topic)
    return None if described is None else TopicShape(*described)
