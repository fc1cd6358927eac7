"""What can be checked of the container image and the compose examples without building
the image (that takes minutes: scripts/image builds and runs it, with test_image.py, in CI).

These tests hold the Dockerfile and deploy/ to the code: the paths the Dockerfile copies
exist, its binary name and port match the crate and the defaults, the compose files parse
and agree with the server configurations beside them, and the `healthcheck` subcommand the
image's HEALTHCHECK runs works against a running instance.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import yaml

from component import binary_path
from ejabberd import Ejabberd
from prosody import Prosody
from xmpp_server import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    """The arguments of every instruction `name`, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", joined, re.M)]


def test_every_path_the_dockerfile_copies_exists():
    copies = [c for c in instructions("COPY") if not c.startswith("--from")]
    assert copies, "the build stage copies the sources"
    for args in copies:
        *sources, _dest = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_binary_name_and_port_match_the_code():
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    (binary,) = [b["name"] for b in cargo["bin"]]
    assert f"--bin {binary}" in " ".join(instructions("RUN"))
    assert f"/usr/local/bin/{binary}" in " ".join(instructions("COPY"))
    assert instructions("ENTRYPOINT") == [f'["{binary}"]']
    config = tomllib.loads((ROOT / "config" / "xtls-component.toml").read_text())
    default_port = int(config["admin"]["listen"].rsplit(":", 1)[1])
    assert instructions("EXPOSE") == [str(default_port)]
    image_config = tomllib.loads((ROOT / "config" / "docker.toml").read_text())
    assert image_config["admin"]["listen"] == f"0.0.0.0:{default_port}"
    assert image_config["store"]["url"].startswith("sqlite:///var/lib/xtls-component/")
    assert "VOLUME /var/lib/xtls-component" in DOCKERFILE
    (health,) = instructions("HEALTHCHECK")
    assert f'CMD ["{binary}", "healthcheck"' in health
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    assert instructions("USER") == ["xtls"], "the image runs as a non-root user"
    labels = " ".join(instructions("LABEL"))
    for key in ("title", "version", "source", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_the_image_config_holds_no_secret_and_needs_them_from_the_environment(tmp_path):
    """The image's own configuration starts nothing until the operator gives the domain,
    the secret and the token, by value or as mounted files (the *_FILE forms)."""
    binary, image_config = str(binary_path()), str(ROOT / "config" / "docker.toml")
    text = (ROOT / "config" / "docker.toml").read_text()
    assert "secret" not in text.replace("SECRET", "").split("[admin]")[1] and "token =" not in text

    def check(**env):
        return subprocess.run([binary, "check-config", "--config", image_config], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", **env})

    bare = check()
    assert bare.returncode == 2 and "component.domain" in bare.stderr, bare.stderr
    (tmp_path / "secret").write_text("component-secret\n")
    (tmp_path / "token").write_text("admin-token-123456\n")
    given = check(XTLS_COMPONENT__DOMAIN="bots.example.org", XTLS_COMPONENT__SERVER="prosody:5347",
                  XTLS_COMPONENT__SECRET_FILE=str(tmp_path / "secret"),
                  XTLS_ADMIN__TOKEN_FILE=str(tmp_path / "token"))
    assert given.returncode == 0, given.stderr
    no_token = check(XTLS_COMPONENT__DOMAIN="bots.example.org", XTLS_COMPONENT__SECRET="component-secret")
    assert no_token.returncode == 2 and "XTLS_ADMIN__TOKEN" in no_token.stderr, no_token.stderr


def compose(server: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / server / "docker-compose.yml").read_text())


def component_env(doc: dict) -> dict:
    return doc["services"]["xtls-component"]["environment"]


def test_prosody_compose_matches_its_server_config():
    doc = compose("prosody")
    env = component_env(doc)
    cfg = (ROOT / "deploy" / "prosody" / "prosody.cfg.lua").read_text()
    host, port = env["XTLS_COMPONENT__SERVER"].rsplit(":", 1)
    assert host in doc["services"], f"{host} is not a service of the compose file"
    assert re.search(rf"component_ports\s*=\s*{{\s*{port}\s*}}", cfg), "component port differs"
    assert re.search(rf'Component\s+"{re.escape(env["XTLS_COMPONENT__DOMAIN"])}"', cfg)
    assert f'component_secret = "{env["XTLS_COMPONENT__SECRET"]}"' in cfg
    assert doc["services"]["xtls-component"]["ports"] == [f"127.0.0.1:{instructions('EXPOSE')[0]}:8347"]


def test_ejabberd_compose_matches_its_server_config():
    doc = compose("ejabberd")
    env = component_env(doc)
    cfg = yaml.safe_load((ROOT / "deploy" / "ejabberd" / "ejabberd.yml").read_text())
    host, port = env["XTLS_COMPONENT__SERVER"].rsplit(":", 1)
    assert host in doc["services"]
    (service,) = [l for l in cfg["listen"] if l["module"] == "ejabberd_service"]
    assert service["port"] == int(port)
    assert service["hosts"][env["XTLS_COMPONENT__DOMAIN"]]["password"] == env["XTLS_COMPONENT__SECRET"]
    assert doc["services"]["xtls-component"]["ports"] == [f"127.0.0.1:{instructions('EXPOSE')[0]}:8347"]


def readme_block(heading: str) -> str:
    """The first fenced code block after the line starting with `heading` in the README."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"^{re.escape(heading)}.*?^```\w*\n(.*?)^```", readme, re.M | re.S)
    assert match, f"no code block after {heading!r} in README.md"
    return match.group(1)


def service_listener(cfg: dict) -> dict:
    (listener,) = [l for l in cfg["listen"] if l["module"] == "ejabberd_service"]
    return listener


def test_readme_server_snippets_match_the_tested_configs(tmp_path):
    """The README's component declarations say what the end-to-end servers are run with."""
    tested = service_listener(yaml.safe_load(Ejabberd(workdir=str(tmp_path / "ejabberd")).config_path.read_text()))
    shown = service_listener(yaml.safe_load(readme_block("**ejabberd**")))
    assert set(shown) == set(tested), "README and tests/e2e/ejabberd.py set different listener options"
    for key in set(tested) - {"port", "hosts"}:
        assert shown[key] == tested[key], f"{key}: README {shown[key]!r}, tested {tested[key]!r}"
    assert all(set(h) == {"password"} for h in [*shown["hosts"].values(), *tested["hosts"].values()])

    tested_lua = Prosody(workdir=str(tmp_path / "prosody")).config_path.read_text()
    shown_lua = readme_block("**Prosody**")
    for setting in ("component_interfaces",):
        (line,) = [l for l in shown_lua.splitlines() if l.startswith(setting)]
        assert line.split("--")[0].strip() in tested_lua, f"README's {line!r} is not what the tests run"
    # Stock network settings on both sides: the component needs no Nagle setting.
    assert "network_settings" not in shown_lua and "network_settings" not in tested_lua
    assert re.search(r'^Component "[^"]+"\n    component_secret = "[^"]+"$', shown_lua, re.M)
    assert re.search(r'^Component "[^"]+"\n    component_secret = "[^"]+"$', tested_lua, re.M)


def test_healthcheck_subcommand_against_a_running_instance(component):
    binary = str(binary_path())
    ok = subprocess.run(
        [binary, "healthcheck", "--addr", f"127.0.0.1:{component.admin_port}"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    # From the configuration, as the image's HEALTHCHECK does (only admin.listen is read).
    from_config = subprocess.run(
        [binary, "healthcheck", "--config", str(component.config_path)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert from_config.returncode == 0, from_config.stderr
    down = subprocess.run(
        [binary, "healthcheck", "--addr", f"127.0.0.1:{free_port()}", "--timeout", "2"],
        capture_output=True,
        text=True,
    )
    assert down.returncode == 1 and "unhealthy" in down.stderr, (down.returncode, down.stderr)


def test_a_second_instance_on_the_same_store_file_stops_at_once_and_says_why(component, tmp_path):
    """A SQLite store serves one instance: a second process given the same file stops before it
    touches it (its start-up would close the first one's live tunnels as stale), names the
    holder, and the first one keeps serving."""
    config = component.config_path.read_text()
    config = re.sub(r'listen = "127\.0\.0\.1:\d+"', f'listen = "127.0.0.1:{free_port()}"', config, count=1)
    second = tmp_path / "second.toml"
    second.write_text(config)
    env = {"PATH": "/usr/bin:/bin", "RUST_LOG": "info"}
    done = subprocess.run([str(binary_path()), "serve", "--config", str(second)], capture_output=True, text=True,
                          timeout=30, env=env, cwd=tmp_path)
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    assert f"another xtls-component (pid {component.pid}) already uses the store {component.store_path}" in said, said
    assert component.get("/readyz")[0] == 200
    assert component.running()


def test_the_failover_configuration_in_docs_scaling_passes_check_config(tmp_path):
    """docs/scaling.md's configuration for an active instance and standbys is a valid one:
    its secret files put in place, `check-config` accepts it as it is written."""
    doc = (ROOT / "docs" / "scaling.md").read_text()
    match = re.search(r"^## An active instance and standbys.*?^```toml\n(.*?)^```", doc, re.M | re.S)
    assert match, "no toml block in docs/scaling.md's failover section"
    block = match.group(1)
    config = tomllib.loads(block)
    assert config["instances"]["mode"] == "failover"
    assert config["store"]["url"].startswith("postgres://") and "key_file" in config["store"]
    # The files it names, made here: a secret, a token, a store key.
    contents = {"component-secret": "s3cret-component", "admin-token": "admin-token-0123456789",
                "store-key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}
    for name, text in contents.items():
        (tmp_path / name).write_text(text + "\n")
        block = block.replace(f"/etc/xtls-component/{name}", str(tmp_path / name))
    assert "/etc/xtls-component" not in block, block
    path = tmp_path / "xtls.toml"
    path.write_text(block)
    done = subprocess.run([str(binary_path()), "check-config", "--config", str(path)], capture_output=True,
                          text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and "configuration ok" in done.stdout + done.stderr, done
