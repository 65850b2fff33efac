"""The ``outer-transaction`` scenario: sessions joined to transactions they did not begin.

A writer opens a ``Connection``, begins a transaction on it (the *outer* transaction), and runs a
:class:`~sa_cache.CachingSession` bound to that connection with a random
``join_transaction_mode`` (``conditional_savepoint``, ``create_savepoint``, ``rollback_only``):
the session locks rows, writes new versions and calls ``commit()``, which commits nothing in the
database. A second session sharing the connection then reads the rows back; plain SQLAlchemy
gives it the versions the first session wrote (its own connection's uncommitted writes), so the
caching session must too: anything else is a *wrong answer* (counted with the mismatches). Then
the outer transaction commits or rolls back. Some writers first let a session roll back
(to its savepoint) before another session on the same connection writes.

For the checker, a version written inside an outer transaction is committed when the *outer*
commit is: its "commit called" and "commit returned" are the outer ``commit()``'s, and a rolled
back outer transaction's versions are never committed. A reader elsewhere that fills the cache
between the session's ``commit()`` and the outer commit, and is still served after the outer
commit returned, is a stale read.

Readers also run fresh sessions on a connection of their own (outside any outer transaction:
those sessions begin their transaction themselves and use the cache as usual). The mixed
workload's writers keep running beside them.
"""

from __future__ import annotations

import warnings

from sqlalchemy.orm import Session

from .checker import (
    IN_TRANSACTION_KINDS,
    READ_KINDS,
    WRITE_KINDS,
    Conflict,
    Hot,
    Ref,
    Scenario,
    Scope,
    Worker,
    clock,
)

JOIN_MODES = ("conditional_savepoint", "create_savepoint", "rollback_only")


class OuterTransactionWorker(Worker):
    read_kinds = {**READ_KINDS, "shared_connection": 20}
    write_kinds = {
        **WRITE_KINDS,
        "outer_commit": 30,
        "outer_rollback": 10,
        "outer_inner_rollback": 10,
    }
    in_transaction_kinds = IN_TRANSACTION_KINDS

    # -- reads ----------------------------------------------------------------------------

    def read_shared_connection(self) -> None:
        """Two sessions in turn on one connection that is in no transaction: each begins its own
        and reads as any session does."""
        with self.engine.connect() as conn:
            for _ in range(2):
                with self.factory(bind=conn) as session:
                    kind = self.choose({"get": 2, "lazy": 1, "query_get": 1, "get_many": 1})
                    self.read_one(session, kind, Scope(snapshot=False, label="shared."))
                conn.rollback()  # nothing written: ends the transaction the session began

    # -- writes ---------------------------------------------------------------------------

    def write_outer_commit(self) -> None:
        self.write_outer(commit=True)

    def write_outer_rollback(self) -> None:
        self.write_outer(commit=False)

    def write_outer_inner_rollback(self) -> None:
        self.write_outer(commit=self.rng.random() < 0.7, inner_rollback=True)

    def write_outer(self, commit: bool, inner_rollback: bool = False) -> None:
        mode = self.rng.choice(JOIN_MODES)
        label = f"outer_{'commit' if commit else 'rollback'}.{mode}"
        with self.engine.connect() as conn:
            outer = conn.begin()
            try:
                if inner_rollback:
                    self.rolled_back_session(conn, label)
                changes = self.joined_session_writes(conn, mode)
                self.read_back(conn, changes, label)
                if not commit:
                    outer.rollback()
                    self.out.aborted += [(row, version) for row, version, _ in changes]
                    self.out.outcomes["rolled back"] += 1
                    return
                called = clock()
                try:
                    outer.commit()
                except Exception:
                    self.out.uncertain += changes
                    raise
                returned = clock()
            except BaseException:
                if outer.is_active:
                    outer.rollback()
                raise
        for row, version, state in changes:
            self.out.writes.append((row, version, state, called, returned, label + self.tag))
        self.out.outcomes["committed"] += 1

    def joined_session_writes(self, conn, mode: str) -> list[tuple[int, int, int | None]]:
        """A session joined to the outer transaction locks and updates one or two rows (or
        deletes one), then calls ``commit()``: the rows stay locked until the outer transaction
        ends, so their versions are still drawn in commit order."""
        with self.factory(bind=conn, join_transaction_mode=mode) as session:
            objs = self.lock(session, self.picks(1, 2))
            if not objs:
                raise Conflict
            if len(objs) == 1 and self.rng.random() < 0.2:
                version = self.next_version()
                session.delete(objs[0])
                changes: list[tuple[int, int, int | None]] = [(objs[0].id, version, None)]
            else:
                changes = [self.set_version(obj) for obj in objs]
            session.commit()
        return changes

    def rolled_back_session(self, conn, label: str) -> None:
        """A session (on a savepoint of the outer transaction) writes a version and rolls it
        back: no reader anywhere may ever see it."""
        with self.factory(bind=conn, join_transaction_mode="create_savepoint") as session:
            objs = self.lock(session, [self.pick()])
            if not objs:
                return
            row, version, _ = self.set_version(objs[0])
            session.flush()
            self.out.aborted.append((row, version))
            session.rollback()

    def read_back(self, conn, changes: list[tuple[int, int, int | None]], label: str) -> None:
        """Another session on the connection sees the outer transaction's writes, as plain
        SQLAlchemy does: by get, get_many, a lazy load or Query.get."""
        rows = [row for row, _, _ in changes]
        expected = {row: state for row, _, state in changes}
        kind = self.choose({"get": 2, "get_many": 1, "lazy": 1, "query_get": 1})
        with warnings.catch_warnings(), self.factory(bind=conn) as session:
            warnings.simplefilter("ignore")  # Query.get is legacy
            seen = self.look_up(session, kind, rows)
        for row in rows:
            if seen[row] != expected[row]:
                self.out.wrong_answers.append(
                    f"wrong answer: {kind} of row {row} on the connection of an outer "
                    f"transaction ({label}) saw version {seen[row]}, that connection holds "
                    f"{expected[row]}"
                )

    def look_up(self, session: Session, kind: str, rows: list[int]) -> dict[int, int | None]:
        if kind == "get_many":
            found = session.get_many(Hot, rows)  # type: ignore[attr-defined]
            objs = dict(zip(rows, found, strict=True))
        elif kind == "lazy":
            objs = {}
            for row in rows:
                ref = session.get(Ref, row)
                assert ref is not None
                objs[row] = ref.hot
        elif kind == "query_get":
            objs = {row: session.query(Hot).get(row) for row in rows}
        else:
            objs = {row: session.get(Hot, row) for row in rows}
        return {row: None if obj is None else obj.version for row, obj in objs.items()}


class OuterTransactionScenario(Scenario):
    name = "outer-transaction"
    summary = (
        "sessions sharing one connection and joined to outer transactions that commit or roll "
        "back, beside the mixed workload"
    )
    worker_class = OuterTransactionWorker
