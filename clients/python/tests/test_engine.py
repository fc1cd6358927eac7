"""The package without a network: two TLS engines against each other in memory, the codes'
test vectors, and the known-keys file."""

from __future__ import annotations

import pytest

from slixmpp_xtls import Identity, KnownKeys, TlsEngine, TlsError, normalize_code, sas_code, xmpp_addrs
from slixmpp_xtls.verify import SAS_LABEL


def pair_of_engines(client_judge=lambda der: None, server_judge=lambda der: None):
    alice, bot = Identity.generate("alice@example.org"), Identity.generate("bot@bots.example.org")
    client = TlsEngine(alice, server_side=False, judge=client_judge)
    server = TlsEngine(bot, server_side=True, judge=server_judge)
    return alice, bot, client, server


def run_handshake(client: TlsEngine, server: TlsEngine) -> None:
    """Shuttles bytes until both ends are done (or one raises)."""
    client.start()
    for _ in range(10):
        for chunk in client.take_chunks():
            server.feed(chunk)
        for chunk in server.take_chunks():
            client.feed(chunk)
        if client.handshake_done and server.handshake_done:
            for chunk in client.take_chunks():
                server.feed(chunk)
            return
    raise AssertionError("the handshake did not finish")


def test_both_ends_see_each_others_certificate_and_share_the_exporter():
    alice, bot, client, server = pair_of_engines()
    run_handshake(client, server)
    assert client.version == "TLSv1.3"
    assert server.peer_cert_der == alice.cert_der and client.peer_cert_der == bot.cert_der
    assert client.export(SAS_LABEL, b"x" * 64) == server.export(SAS_LABEL, b"x" * 64)
    client.write(b"<message xmlns='jabber:client'><body>hi</body></message>")
    (stanza,) = [s for c in client.take_chunks() for s in server.feed(c)]
    assert stanza.findtext("{jabber:client}body") == "hi"


def test_a_refused_certificate_fails_the_handshake_with_the_reason():
    _, _, client, server = pair_of_engines(server_judge=lambda der: "not the key we know")
    with pytest.raises(TlsError) as failed:
        run_handshake(client, server)
    assert failed.value.rejected == "not the key we know" and not failed.value.alert


def test_identities_name_their_jid_and_keep_the_key_private(tmp_path):
    made = Identity.load_or_create(tmp_path / "id", "alice@example.org")
    assert xmpp_addrs(made.cert_der) == ["alice@example.org"]
    assert (tmp_path / "id" / "key.pem").stat().st_mode & 0o777 == 0o600
    again = Identity.load_or_create(tmp_path / "id", "alice@example.org")
    assert again.spki_sha256 == made.spki_sha256
    (tmp_path / "id" / "key.pem").chmod(0o644)
    with pytest.raises(PermissionError):
        Identity.load_or_create(tmp_path / "id", "alice@example.org")


def test_codes_follow_the_documented_vectors():
    assert sas_code(bytes(range(32))) == ("aaamh", "066051")
    assert sas_code(b"\xff" * 32) == ("9kiui", "967295")
    assert normalize_code("ab1cd-ef0gh") == "AB1CDEF0GH"
    assert normalize_code(" iLo0 ") == "1100"


def test_known_keys_are_kept_in_the_xtls_clients_file_format(tmp_path):
    path = tmp_path / "known_bots"
    known = KnownKeys(path)
    assert known.check("bot@example.org", "AA:BB") == "new"
    known.remember("bot@example.org", "AA:BB")
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert [line.split()[:3] for line in lines] == [["bot@example.org", "AA:BB", "tofu"]]
    assert path.stat().st_mode & 0o777 == 0o600
    again = KnownKeys(path)
    assert again.check("bot@example.org", "AA:BB") == "known"
    assert again.check("bot@example.org", "CC:DD") == "changed"


def test_a_peer_cannot_grow_the_parser_without_bound():
    from xml.etree.ElementTree import ParseError

    from slixmpp_xtls.tls import MAX_STANZA, StanzaParser

    parser = StanzaParser()
    parser.feed(b"<message xmlns='jabber:client'><body>")
    with pytest.raises(ParseError, match="larger than"):
        for _ in range(MAX_STANZA // 4096 + 2):
            parser.feed(b"x" * 4096)
    deep = StanzaParser()
    with pytest.raises(ParseError, match="deeper"):
        deep.feed(b"<message xmlns='jabber:client'>" + b"<a>" * 40)
    fine = StanzaParser()
    (done,) = fine.feed(b"<message xmlns='jabber:client'><body>" + b"y" * 1000 + b"</body></message>")
    assert done.findtext("{jabber:client}body") == "y" * 1000


def test_what_we_write_into_a_tunnel_carries_no_routing():
    from slixmpp_xtls.tunnel import _without_routing

    stanza = b"<message from='a@b/c' xmlns='jabber:client' to=\"d@e\" id='1'><body to='x'>hi</body></message>"
    assert _without_routing(stanza) == b"<message xmlns='jabber:client' id='1'><body to='x'>hi</body></message>"
