"""The checker's named scenarios (``python -m tests.stress --scenario NAME``), in the order a
full run takes them; by default a run takes every one that lists its database."""

from __future__ import annotations

from .checker import (
    IN_TRANSACTION_KINDS,
    MIXED,
    READ_KINDS,
    Scenario,
    Worker,
)
from .collections import CollectionScenario
from .increments import IncrementScenario
from .near import NearScenario
from .outage import OutageScenario
from .outer import OuterTransactionScenario


class SnapshotLookupWorker(Worker):
    """Mostly long read transactions of lookups: get, lazy loads, Query.get and get_many in a
    row (a plain SELECT now and then), while the mixed workload's writers run."""

    read_fraction = 0.65
    read_kinds = {**READ_KINDS, "transaction": 120}
    in_transaction_kinds = {**IN_TRANSACTION_KINDS, "get": 5, "lazy": 4, "select": 1}
    reads_per_transaction = (4, 10)


class SnapshotLookupScenario(Scenario):
    name = "rr-lookups"
    summary = (
        "REPEATABLE READ transactions of several lookups in a row (get, lazy loads, Query.get, "
        "get_many) beside concurrent writers; 'started' is the transaction's first read"
    )
    databases = ("mariadb",)
    isolation_level = "REPEATABLE READ"
    worker_class = SnapshotLookupWorker


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        MIXED,
        OuterTransactionScenario(),
        IncrementScenario(),
        SnapshotLookupScenario(),
        OutageScenario(),
        NearScenario(),
        CollectionScenario(),
    )
}
