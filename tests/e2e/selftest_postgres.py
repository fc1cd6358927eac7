"""The PostgreSQL harness itself (tests/e2e/postgres.py): private, on loopback, stopped by pid,
and two of them side by side."""

from __future__ import annotations

import os

from postgres import Postgres


def test_two_private_servers_run_side_by_side_and_stop_by_their_pids():
    first, second = Postgres(), Postgres()
    try:
        first.start()
        second.start()
        assert first.port != second.port and first.pid != second.pid
        first.psql("CREATE TABLE mark (v TEXT); INSERT INTO mark VALUES ('first')")
        assert first.psql("SELECT v FROM mark") == "first"
        assert second.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'mark'") == "0"
        assert first.psql("SHOW listen_addresses") == "127.0.0.1"
        pid = first.pid
        first.stop()
        try:
            os.kill(pid, 0)
            raise AssertionError(f"postmaster {pid} still alive after stop()")
        except ProcessLookupError:
            pass
        assert second.psql("SELECT 1") == "1", "stopping one left the other running"
    finally:
        first.cleanup()
        second.cleanup()
