"""TURN over TCP or TLS with aioice (PyPI), an independent client: allocate through the URI's
server, send one datagram to a UDP echo peer through the relay and wait for it to come back.

    python3 tests/aioice_turn.py URI USER PASSWORD PEER_HOST:PEER_PORT

URI is `turn:HOST:PORT?transport=tcp` or `turns:HOST:PORT?transport=tcp`; for turns: the
certificate is verified with Python's default context (point SSL_CERT_FILE at the test CA).
Prints one JSON line {"relayed", "mapped", "echoed"} and exits 0 when the datagram came back;
exits non-zero otherwise. Bounded: 20 s for the allocation, 10 s for the echo.
"""

import asyncio
import json
import sys
from urllib.parse import urlsplit

import aioice.turn


def parse_uri(uri: str) -> tuple[str, str, int, str]:
    scheme, _, rest = uri.partition(":")
    if scheme not in ("turn", "turns"):
        raise ValueError(f"not a turn: or turns: URI: {uri}")
    hostport, _, query = rest.partition("?")
    parts = urlsplit("//" + hostport)
    params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
    transport = params.get("transport", "tcp" if scheme == "turns" else "udp")
    default_port = 5349 if scheme == "turns" else 3478
    return scheme, parts.hostname, parts.port or default_port, transport


def addr_text(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def main() -> int:
    uri, user, password, peer = sys.argv[1:5]
    scheme, host, port, transport = parse_uri(uri)
    peer_host, _, peer_port = peer.rpartition(":")
    peer_addr = (peer_host.strip("[]"), int(peer_port))
    loop = asyncio.get_running_loop()
    received: asyncio.Future = loop.create_future()

    class Receiver(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            if not received.done():
                received.set_result((data, addr))

        def error_received(self, exc):
            if not received.done():
                received.set_exception(exc)

    turn, _ = await asyncio.wait_for(
        aioice.turn.create_turn_endpoint(
            Receiver,
            server_addr=(host, port),
            username=user,
            password=password,
            ssl=scheme == "turns",
            transport=transport,
        ),
        20,
    )
    try:
        payload = f"aioice over {uri}".encode()
        turn.sendto(payload, peer_addr)
        data, addr = await asyncio.wait_for(received, 10)
        report = {
            "relayed": addr_text(turn.get_extra_info("sockname")),
            "mapped": addr_text(turn.get_extra_info("related_address")),
            "echoed": data == payload and tuple(addr[:2]) == peer_addr,
            "from": addr_text(addr),
        }
    finally:
        turn.close()
        await asyncio.sleep(0.2)
    print(json.dumps(report))
    return 0 if report["echoed"] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
