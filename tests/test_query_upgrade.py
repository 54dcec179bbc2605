"""A query server that runs while the collector upgrades its database refuses clearly, never answers wrong.

A reader refuses any other schema version when it starts (schema.open_reader), but one already
running when the collector (started first, as docs/SCHEMA.md asks) migrates the file kept
answering from what it had read before.  Across version 5 -> 6 that could be wrong: the newest
chunk id it remembers (its open heads) may be handed out again when a version 5 file had
deleted its newest chunks and nothing names their ids.  Each test starts a real TLS query
server on a file at an older version (the read-only connection such a server opened when that
version was current), upgrades the file with the real collector, and asks again over TLS.
"""

from __future__ import annotations

import sqlite3

import pytest
from test_chunk_ids import as_version_5

from collector import schema, wire
from collector.store import open_ingest
from query.client import QueryClient, ServerError
from query.ops import Ops

from helpers import db_query
from query_fixtures import running_server

T0 = 1_700_000_000.0


def fill(path: str, seqs, t0: float) -> None:
    """A collector run (this code) storing `seqs` of sensor s in chunks of 4."""
    store, core = open_ingest(path, store_options={"chunk_datagrams": 4})
    try:
        for i, seq in enumerate(seqs):
            core.receive(wire.encode("s", seq, {"v": float(seq)}, boot=1, ts=t0 + i), t0 + i)
        assert store.flush(core, t0 + len(seqs))
    finally:
        store.close()


def opened_before(path: str):
    """What a server started before the upgrade holds: the read-only connection it opened while
    the file was at its old version (that version's server accepted it)."""
    return lambda: Ops(sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False))


def seqs(client: QueryClient) -> list[int]:
    return [r["seq"] for r in client.request("readings", sensor="s", metric="v")["rows"]]


def v5_collector_retention(path: str) -> None:
    """What a version 5 collector's retention and disk budget left: every chunk, its minute blocks
    and the log rows it came in deleted, so nothing names the ids 1-2 any more (a version 5 file
    hands them out again)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    for table in ("chunk_series", "chunks", "rollup_1m_blocks", "ingest_log"):
        conn.execute(f"DELETE FROM {table}")  # noqa: S608 (fixed names)
    conn.execute("COMMIT")
    conn.close()


@pytest.mark.parametrize("old", [5, 6])
def test_a_server_running_across_the_upgrade_refuses_clearly_and_a_restarted_one_answers(db_path, tls, old):
    fill(db_path, range(8), T0)  # chunks 1 and 2
    if old == 5:
        as_version_5(db_path)
    else:  # version 6 differs only in a central database's uplink_quarantine (test_quarantine_ids.py)
        conn = sqlite3.connect(db_path, isolation_level=None)
        conn.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
        conn.close()
    with running_server(db_path, tls, make_ops=opened_before(db_path), workers=1) as server:
        port = server.server_address[1]
        with QueryClient("127.0.0.1", port, ca=tls.ca_pem) as client:
            assert seqs(client) == list(range(8))
            if old == 5:
                v5_collector_retention(db_path)
                assert seqs(client) == []
            fill(db_path, range(8, 12), T0 + 100)  # the new collector: migrates, then a new chunk
            assert db_query(db_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [
                (str(schema.SCHEMA_VERSION),)
            ]
            if old == 5:  # the hazard: the new chunk took an id the server had read before
                assert db_query(db_path, "SELECT id FROM chunks") == [(1,)]
            with pytest.raises(ServerError) as refused:
                seqs(
                    client
                )  # before: 0-11 for 5, 8 of them deleted (its cache); right for 6 (7 changes nothing it reads)
            assert refused.value.code == "schema_changed"
            assert refused.value.message == (
                f"the database was upgraded to schema version {schema.SCHEMA_VERSION} while this server ran "
                f"(it opened version {old}): restart telemetry-query serve"
            )
            assert client.request("ping")["protocol"] >= 1  # the connection stays open
    with running_server(db_path, tls) as server:  # restarted: schema.open_reader takes the new version
        with QueryClient("127.0.0.1", server.server_address[1], ca=tls.ca_pem) as client:
            assert seqs(client) == (list(range(8, 12)) if old == 5 else list(range(12)))
