"""The load tool end to end: `xtls-load` against a private Prosody and the component's echo
bots, in plain and through tunnels, for two in-flight values. Checks what the report says
(every message echoed, every tunnel opened, CPU read from /proc), never how fast: figures
belong to docs/performance.md, not to tests."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from component import Component
from load import bots_toml, limits_toml
from prosody import Prosody

REPO = Path(__file__).resolve().parents[2]


def test_the_load_tool_echoes_in_plain_and_through_tunnels(tmp_path):
    tool = Path(os.environ.get("XTLS_LOAD_BIN") or REPO / "target" / "debug" / "xtls-load")
    assert os.access(tool, os.X_OK), f"{tool} is missing: cargo build"
    server = Prosody()
    comp = None
    try:
        server.start()
        password = secrets.token_urlsafe(12)
        for n in range(2):
            server.register(f"load{n}", password)
        comp = Component(server, bots=bots_toml(2), extra_config=limits_toml(2, 2, 4))
        comp.start()
        report_path = tmp_path / "report.json"
        result = subprocess.run(
            [str(tool), "--server", f"127.0.0.1:{server.c2s_port}", "--host", server.host,
             "--users", "2", "--bot-domain", comp.domain, "--bots", "2",
             "--in-flight", "1,4", "--duration", "1", "--size", "300",
             "--component-pid", str(comp.pid), "--server-pid", str(server.pid),
             "--json", str(report_path)],
            env=dict(os.environ, XTLS_LOAD_PASSWORD=password),
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(report_path.read_text())
        assert report["open"]["tunnels"] == 4 and report["open"]["failed"] == 0, report["open"]
        phases = {(p["mode"], p["in_flight"]): p for p in report["echo"]}
        assert set(phases) == {("plain", 1), ("plain", 4), ("xtls", 1), ("xtls", 4)}
        for key, phase in phases.items():
            assert phase["echoes"] > 0 and phase["lost"] == 0, (key, phase)
            assert phase["rtt_ms"]["p50"] > 0 and phase["rtt_ms"]["p99"] >= phase["rtt_ms"]["p50"], phase
            assert phase["cost"]["server_cpu_s"] >= 0 and phase["cost"]["component_rss_kib"] > 0, phase
        assert [r["in_flight"] for r in report["ratios"]] == [1, 4]
        assert "XTLS/plain throughput" in result.stdout, result.stdout
        # The tunnels were closed at the end; the component saw real TLS traffic.
        status, tunnels = comp.get("/v1/tunnels?state=open")
        assert status == 200 and tunnels == [], tunnels
    finally:
        if comp is not None:
            comp.cleanup()
        server.cleanup()


def test_the_python_cross_check_echoes_in_plain_and_through_a_tunnel(tmp_path):
    """tests/e2e/bench_echo.py (the load tool's cross-check) against a stock Prosody: every
    message echoed in order in both modes, round trips and CPU read; never how fast."""
    from component import binary_path

    report_path = tmp_path / "echo.json"
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("bench_echo.py")),
         "--messages", "40", "--in-flight", "1,4", "--api", "--json", str(report_path)],
        env=dict(os.environ, XTLS_COMPONENT_BIN=str(binary_path())),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert "stock network settings" in report["label"], report["label"]
    assert [row["in_flight"] for row in report["rows"]] == [1, 4]
    for row in report["rows"]:
        for mode in ("plain", "xtls"):
            phase = row[mode]
            assert phase["mode"] == mode and phase["messages"] == 40, phase
            assert 0 < phase["rtt_ms"]["p50"] <= phase["rtt_ms"]["p99"] <= phase["rtt_ms"]["max"], phase
            assert set(phase["cpu_us_per_echo"]) == {"client", "server", "component"}, phase
        assert row["ratio"] > 0
        # The api bot's backend answered every message through the bot API.
        assert row["api"]["messages"] == 40 and row["api_ratio"] > 0, row["api"]
    assert "XTLS/plain" in result.stdout, result.stdout
