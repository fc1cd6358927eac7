"""The container image, run as the README tells users to run it, against the test Prosody and
ejabberd: it runs as 10001:10001, refuses to start without its secrets (exit 2 naming the
variable), becomes ready with them, carries a tunnel from the Python peer, reports healthy
through its HEALTHCHECK, keeps its store on the volume across a replaced container, and on
SIGTERM closes open tunnels (the peer gets `<close/>`) and exits 0.

Needs an image: `scripts/image` builds one and runs this module with XTLS_IMAGE set (CI does
that after the other tests); without XTLS_IMAGE the module is skipped.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from botapi_helpers import until
from conftest import run
from container import ContainerComponent, podman, run_once

IMAGE = os.environ.get("XTLS_IMAGE")
pytestmark = pytest.mark.skipif(not IMAGE, reason="no image to test: scripts/image builds one and sets XTLS_IMAGE")


def echo_bot(comp: ContainerComponent) -> dict:
    status, bot = comp.post("/v1/bots", {"localpart": "echo", "handler": "echo"})
    assert status == 201, bot
    return bot


async def echo_through(users, bot_jid: str, bodies: list[str]) -> list[str]:
    async with users.client("alice") as alice:
        tunnel = await alice.open_tunnel(bot_jid)
        answers = []
        for body in bodies:
            await tunnel.send_message(body)
            answers.append(await tunnel.recv_message())
        await tunnel.close()
        return answers


@pytest.fixture(scope="module")
def image_component(prosody):
    comp = ContainerComponent(prosody, IMAGE, domain=prosody.api_component_domain)
    comp.start()
    try:
        yield comp
    finally:
        comp.cleanup()


def test_the_image_runs_as_10001_with_its_health_check():
    ids = run_once(IMAGE, entrypoint="id")
    assert ids.returncode == 0, ids.stderr
    assert ids.stdout.split() == ["uid=10001(xtls)", "gid=10001(xtls)", "groups=10001(xtls)"]
    image = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    assert image["Config"]["User"] == "xtls"
    assert image["Config"]["StopSignal"] == "SIGTERM"
    # Kept only in the docker format (--format docker): OCI images have no HEALTHCHECK.
    assert image["Healthcheck"]["Test"][1:3] == ["xtls-component", "healthcheck"], image["Healthcheck"]


def test_without_its_secrets_it_refuses_to_start_naming_the_variable():
    done = run_once(IMAGE)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "XTLS_COMPONENT__DOMAIN" in done.stderr


def test_a_tunnel_through_the_container_echoes(image_component, users):
    bot = echo_bot(image_component)
    assert bot["jid"] == f"echo@{image_component.domain}"
    bodies = [f"through the image {i}" for i in range(20)]
    assert run(echo_through(users, bot["jid"], bodies), 60) == bodies


def test_the_health_check_says_healthy(image_component):
    done = podman("healthcheck", "run", image_component.name, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_sigterm_closes_open_tunnels_and_the_store_survives_a_new_container(image_component, users):
    before = {b["jid"]: b["fingerprints"] for b in image_component.get("/v1/bots")[1]}
    assert before, "the earlier test made a bot"
    bot_jid = next(iter(before))

    async def stop_with_a_tunnel_open():
        async with users.client("alice") as alice:
            tunnel = await alice.open_tunnel(bot_jid)
            await tunnel.send_message("before the stop")
            assert await tunnel.recv_message() == "before the stop"
            await asyncio.to_thread(image_component.stop)
            await until(lambda: tunnel.state == "closed", 10, "the tunnel closed")
            assert tunnel.closed_by_peer, "the component sent <close/>"

    run(stop_with_a_tunnel_open(), 60)
    assert image_component.exit_code == 0, image_component.diagnostics()

    image_component.start()
    after = {b["jid"]: b["fingerprints"] for b in image_component.get("/v1/bots")[1]}
    assert after == before, "bots and their keys come back from the volume"
    assert run(echo_through(users, bot_jid, ["after the restart"]), 60) == ["after the restart"]


def test_the_image_serves_ejabberd_too(ejabberd, ejabberd_users):
    comp = ContainerComponent(ejabberd, IMAGE, domain=ejabberd.api_component_domain)
    comp.start()
    try:
        bot = echo_bot(comp)
        assert run(echo_through(ejabberd_users, bot["jid"], ["hello ejabberd"]), 60) == ["hello ejabberd"]
    finally:
        comp.cleanup()
