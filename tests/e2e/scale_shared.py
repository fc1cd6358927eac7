"""Scale check of shared instances: how long N bots take to find their instances.

It starts a private PostgreSQL and a private ejabberd spreading the domain over `--instances`
slots (`domain_balancing`), each on loopback with its own ports and stopped by its pid, then:

1. baseline: one instance in the default mode on the same database, started on the N bots
   (created in step 2): spawn to `/readyz` 200; the instance that serves every bot alone;
2. creates N bots through one of `--instances` shared instances (`POST /v1/bots`, one
   keep-alive connection) and times until every one has an owner;
3. stops them all (SIGTERM) and starts them again at once: spawn to every `/readyz` 200, and
   to every bot claimed by one of the new instances (the probes of every link up);
4. SIGKILLs the instance with the most bots and starts a spare at once: kill to every one
   of its bots claimed by the spare;
5. prints each figure and its ratio to the baseline, and writes them as JSON with `--json`.

    cargo build --release
    XTLS_COMPONENT_BIN=target/release/xtls-component python3 tests/e2e/scale_shared.py [--bots N]

Run it from the repository root as root (ejabberd and PostgreSQL run as their own users).
"""

from __future__ import annotations

import argparse
import http.client
import json
import secrets
import sys
import threading
import time
from datetime import datetime, timezone

from component import Component
from ejabberd import Ejabberd
from postgres import Postgres
from xmpp_server import free_port

SHARED = '[instances]\nmode = "shared"\n'

PASSWORD = "scale-password"


def owners(postgres: Postgres, database: str) -> dict[str, str]:
    rows = postgres.psql("SELECT o.bot_jid, o.instance_id FROM bot_owners o", database=database)
    return dict(line.split("|") for line in rows.splitlines() if line)


def wait_owned(postgres: Postgres, database: str, count: int, by: set[str], timeout: float) -> float:
    """Seconds until `count` bots are owned by instances in `by` (polled every 50 ms)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        held = postgres.psql(
            "SELECT count(*) FROM bot_owners WHERE instance_id IN ({})".format(
                ", ".join(f"'{i}'" for i in by)), database=database)
        if int(held) >= count:
            return time.monotonic() - started
        time.sleep(0.05)
    raise SystemExit(f"not {count} bots owned by {by} within {timeout} s")


def start_all(comps: list[Component], timeout: float) -> float:
    """Starts every instance at once; seconds until the last one is ready."""
    started = time.monotonic()
    errors: list[BaseException] = []

    def one(comp: Component) -> None:
        try:
            comp.start(timeout=timeout)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(c,)) for c in comps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.monotonic() - started


MILESTONES = ("admin API listening", "link up", "route probes sent", "bots claimed")


def milestones(comp: Component, since: float) -> dict[str, float]:
    """Seconds from `since` (a wall-clock time) to the last log line of each milestone."""
    found: dict[str, float] = {}
    for line in comp.log_path.read_text(errors="replace").splitlines():
        for name in MILESTONES:
            if name in line:
                stamp = datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc)
                found[name] = stamp.timestamp() - since
    return found


def this(comp: Component) -> str:
    return comp.get("/v1/instances")[1]["this"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bots", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    postgres = Postgres()
    ejabberd = Ejabberd(balanced_slots=args.instances)
    comps: list[Component] = []
    figures: dict = {"bots": args.bots, "instances": args.instances}
    try:
        postgres.start()
        ejabberd.start()
        database = f"xtls_{free_port()}"
        postgres.psql(f"CREATE DATABASE {database}", database="postgres")
        url = f"postgres://postgres:{PASSWORD}@127.0.0.1:{postgres.port}/{database}"
        token = secrets.token_urlsafe(24)
        domain = ejabberd.api_component_domain

        def instance(extra: str, key: str | None) -> Component:
            comp = Component(ejabberd, domain=domain, bots="", store_url=url, store_key=key,
                             token=token, extra_config=extra)
            if extra:
                comp.config_path.write_text(comp.config_path.read_text() + f'advertise_url = "{comp.base_url}"\n')
            comps.append(comp)
            return comp

        shared = [instance(SHARED, comps[0].store_key if comps else None) for _ in range(args.instances)]
        key = shared[0].store_key
        start_all(shared, 60)

        # 2. N bots through one instance, each claimed by the instance its probe reaches.
        creator = shared[0]
        conn = http.client.HTTPConnection("127.0.0.1", creator.admin_port, timeout=30)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        started = time.monotonic()
        for i in range(args.bots):
            conn.request("POST", "/v1/bots", json.dumps({"localpart": f"s{i:06d}", "handler": "echo"}), headers)
            answer = conn.getresponse()
            answer.read()
            if answer.status != 201:
                raise SystemExit(f"POST /v1/bots -> {answer.status}")
        created = time.monotonic() - started
        ids = {this(c) for c in shared}
        owned_after = wait_owned(postgres, database, args.bots, ids, 120)
        figures["create_s"] = created
        figures["owned_after_last_create_s"] = owned_after
        print(f"{args.bots} bots created in {created:.1f} s; all owned {owned_after:.2f} s after the last")

        # 3. Every instance again at once.
        for comp in shared:
            comp.stop(timeout=30)
        started = time.monotonic()
        ready = start_all(shared, 120)
        ids_now = [this(c) for c in shared]
        wait_owned(postgres, database, args.bots, set(ids_now), 300)
        figures["restart_all_claimed_s"] = time.monotonic() - started
        held = owners(postgres, database)
        per = [sum(o == i for o in held.values()) for i in ids_now]
        figures["restart_ready_s"] = ready
        figures["bots_per_instance"] = per
        print(f"restart: ready {ready:.2f} s, every bot claimed {figures['restart_all_claimed_s']:.2f} s "
              f"after the spawn; bots per instance {per}")

        # 4. SIGKILL the instance with the most bots; a spare takes its slot and its bots.
        victim = max(range(len(shared)), key=lambda i: per[i])
        spare = instance(SHARED, key)
        shared[victim].kill()
        killed = time.monotonic()
        killed_at = time.time()  # the wall clock, as the log stamps it
        spare.start(timeout=60)
        spare_id = this(spare)
        wait_owned(postgres, database, per[victim], {spare_id}, 300)
        took = time.monotonic() - killed
        figures["takeover_s"] = took
        figures["takeover_milestones_s"] = milestones(spare, killed_at)
        print("  the spare's log, seconds after the kill:",
              ", ".join(f"{k} {v:.2f}" for k, v in figures["takeover_milestones_s"].items()))
        print(f"takeover: the spare owned the dead instance's {per[victim]} bots {took:.2f} s after the kill")
        for comp in list(comps):
            comp.stop(timeout=30)

        # 1. Baseline: one instance alone on the same database and bots.
        alone = instance("", key)
        started = time.monotonic()
        alone.start(timeout=120)
        figures["single_ready_s"] = time.monotonic() - started
        base = figures["single_ready_s"]
        print(f"baseline: one instance alone ready on the {args.bots} bots in {base:.2f} s")
        for name in ("restart_ready_s", "restart_all_claimed_s", "takeover_s"):
            figures[name.replace("_s", "_ratio")] = figures[name] / base
            print(f"  {name}: {figures[name]:.2f} s = {figures[name] / base:.2f} x baseline")
        if args.json:
            with open(args.json, "w") as out:
                json.dump(figures, out, indent=2)
        return 0
    finally:
        for comp in comps:
            comp.cleanup()
        ejabberd.cleanup()
        postgres.cleanup()


if __name__ == "__main__":
    sys.exit(main())
