"""One WebRTC peer (aiortc) for tests/firewall_call.rs: a DataChannel call through TURN only.

Run inside a client namespace (`ip netns exec NS python3 firewall_peer.py ...`). It talks to the
test over stdin/stdout, one JSON object per line prefixed with "FWPEER " (anything else it prints,
e.g. aiortc's logs on stderr, is for failure reports only):

    caller -> test    {"type": "offer", "sdp": ..., "gather_ms": N}
    test -> callee    the same line
    callee -> test    {"type": "answer", "sdp": ..., "gather_ms": N}
    test -> caller    the same line
    both -> test      {"type": "report", ...}   then the process exits (0 even on failure: the
                                                report says what happened; 2 on a usage error)

The caller opens DataChannel "echo", sends MESSAGES messages and counts the echoes, then says
"bye"; the callee echoes everything but "bye". The only ICE server is the one URL given, with
iceTransportPolicy "relay", so the only candidates are relay candidates from that server. For
turns: the TLS certificate is verified against SSL_CERT_FILE (the test's CA) and the IP or name
in the URL.

Every wait is bounded (--timeout, in seconds, for the whole run).
"""

import argparse
import asyncio
import json
import sys
import time

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)

MESSAGES = 20


def emit(obj):
    sys.stdout.write("FWPEER " + json.dumps(obj) + "\n")
    sys.stdout.flush()


async def read_message(kind):
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            raise RuntimeError(f"stdin closed while waiting for {kind}")
        line = line.strip()
        if line.startswith("FWPEER "):
            line = line[len("FWPEER "):]
        if not line:
            continue
        msg = json.loads(line)
        if msg.get("type") == kind:
            return msg


def candidates_of(sdp):
    out = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            f = line[len("a=candidate:"):].split()
            typ = f[f.index("typ") + 1] if "typ" in f else "?"
            out.append(f"{typ} {f[2].lower()} {f[4]}:{f[5]}")
    return out


def describe_selected(pc):
    """The nominated candidate pair of the ICE connection under the SCTP transport, and what
    the local relay candidate's TURN connection runs over."""
    try:
        ice = pc.sctp.transport.transport  # RTCDtlsTransport -> RTCIceTransport
        conn = ice._connection  # aioice.Connection
    except Exception as e:  # noqa: BLE001 - a report, not a control path
        return {"error": f"no ICE connection: {e!r}"}
    out = {
        "turn_transport": conn.turn_transport,
        "turn_ssl": bool(conn.turn_ssl),
    }
    pairs = list(conn._nominated.values())
    if not pairs:
        out["error"] = "no nominated pair"
        return out
    pair = pairs[0]
    lc, rc = pair.local_candidate, pair.remote_candidate
    out["local"] = {
        "type": lc.type,
        "address": f"{lc.host}:{lc.port}",
        "related": f"{lc.related_address}:{lc.related_port}",
    }
    out["remote"] = {"type": rc.type, "address": f"{rc.host}:{rc.port}"}
    try:
        turn = pair.protocol.transport  # aioice.turn.TurnTransport
        inner = turn._TurnTransport__inner_protocol.transport  # the TCP/TLS stream
        peer = inner.get_extra_info("peername")
        out["turn_server"] = f"{peer[0]}:{peer[1]}" if peer else None
        local = inner.get_extra_info("sockname")
        out["turn_stream_local"] = f"{local[0]}:{local[1]}" if local else None
        # The Allocate's XOR-MAPPED-ADDRESS (aioice hides it in the SDP under relay policy).
        mapped = turn.get_extra_info("related_address")
        out["turn_mapped"] = f"{mapped[0]}:{mapped[1]}" if mapped else None
        ssl_object = inner.get_extra_info("ssl_object")
        if ssl_object is not None:
            out["tls_version"] = ssl_object.version()
            out["tls_cipher"] = ssl_object.cipher()[0]
    except Exception as e:  # noqa: BLE001
        out["turn_stream_error"] = repr(e)
    return out


async def run(args, report):
    t0 = time.monotonic()

    def ms():
        return round((time.monotonic() - t0) * 1000)

    config = RTCConfiguration(
        iceServers=[
            RTCIceServer(urls=[args.url], username=args.user, credential=args.credential)
        ],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
    )
    pc = RTCPeerConnection(configuration=config)
    report["url"] = args.url
    states = report.setdefault("states", [])
    connected = asyncio.Event()
    failed = asyncio.Event()

    @pc.on("connectionstatechange")
    def on_state():
        states.append(f"{pc.connectionState}@{ms()}ms")
        if pc.connectionState == "connected":
            report["connected_ms"] = ms()
            connected.set()
        elif pc.connectionState in ("failed", "closed"):
            failed.set()

    echoes = asyncio.Queue()
    bye = asyncio.Event()
    opened = asyncio.Event()

    if args.role == "caller":
        dc = pc.createDataChannel("echo")

        @dc.on("open")
        def on_open():
            report["dc_open_ms"] = ms()
            opened.set()

        @dc.on("message")
        def on_message(m):
            echoes.put_nowait(m)

        await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate
        report["gather_ms"] = ms()
        report["local_candidates"] = candidates_of(pc.localDescription.sdp)
        emit({"type": "offer", "sdp": pc.localDescription.sdp, "gather_ms": ms()})
        answer = await read_message("answer")
        report["remote_candidates"] = candidates_of(answer["sdp"])
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
    else:

        @pc.on("datachannel")
        def on_datachannel(channel):
            report["dc_open_ms"] = ms()

            @channel.on("message")
            def on_message(m):
                if m == "bye":
                    bye.set()
                else:
                    report["echoed"] = report.get("echoed", 0) + 1
                    channel.send(m)

        offer = await read_message("offer")
        t0 = time.monotonic()  # the callee's clock starts with the offer
        report["remote_candidates"] = candidates_of(offer["sdp"])
        await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        report["gather_ms"] = ms()
        report["local_candidates"] = candidates_of(pc.localDescription.sdp)
        emit({"type": "answer", "sdp": pc.localDescription.sdp, "gather_ms": ms()})

    done = asyncio.ensure_future(connected.wait())
    bad = asyncio.ensure_future(failed.wait())
    await asyncio.wait([done, bad], return_when=asyncio.FIRST_COMPLETED)
    done.cancel()
    bad.cancel()
    if not connected.is_set():
        report["error"] = f"peer connection {pc.connectionState}, not connected"
        report["selected"] = describe_selected(pc)
        await pc.close()
        return

    if args.role == "caller":
        await asyncio.wait_for(opened.wait(), 10)
        t1 = time.monotonic()
        for i in range(MESSAGES):
            dc.send(f"echo-{i}")
        got = 0
        for i in range(MESSAGES):
            m = await asyncio.wait_for(echoes.get(), 10)
            if m != f"echo-{i}":
                report["error"] = f"echo {i}: got {m!r}"
                break
            got += 1
        report["echoed"] = got
        report["echo_ms"] = round((time.monotonic() - t1) * 1000)
        report["selected"] = describe_selected(pc)
        report["final_state"] = pc.connectionState
        dc.send("bye")
        await asyncio.sleep(0.3)  # let "bye" leave before the close
    else:
        await asyncio.wait_for(bye.wait(), 30)
        report["selected"] = describe_selected(pc)
        report["final_state"] = pc.connectionState
    await pc.close()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["caller", "callee"], required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--credential", required=True)
    p.add_argument("--timeout", type=float, default=40)
    args = p.parse_args()
    report = {"type": "report", "role": args.role}
    try:
        await asyncio.wait_for(run(args, report), args.timeout)
    except asyncio.TimeoutError:
        report["error"] = f"did not finish within {args.timeout} s"
    except Exception as e:  # noqa: BLE001 - everything goes into the report
        report["error"] = f"{type(e).__name__}: {e}"
    emit(report)


if __name__ == "__main__":
    asyncio.run(main())
