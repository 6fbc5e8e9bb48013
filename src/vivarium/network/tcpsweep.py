"""Reset what is left of closed TCP connections inside a sandbox (run in its router namespace).

A script, not a module: the node runs it with the host's Python (`-I -S`, standard library
only) under `nsenter --net=<router ns>`. stdin: {"sandbox": ip, "iface": name, "flows":
[[peer ip, peer port, sandbox port], ...]}, connections the router saw close. stdout: {"reset":
n, "left": [...]}, the flows whose endpoint inside still answers after being reset.

Why: this gVisor sometimes leaves the sandbox's end of a connection its peer closed first in
FIN_WAIT2 for 60 s, with no socket left and the peer long gone (under load, a few percent of
connections), and it cannot checkpoint such an endpoint. Each flow is probed with an ACK the
endpoint cannot accept; a live endpoint answers with an ACK carrying the sequence number it
expects next, and a reset with exactly that number ends it. An endpoint that is gone answers
the probe with a reset. One in TIME_WAIT ignores resets (RFC 1337), so it stays in "left".
"""

from __future__ import annotations

import json
import random
import select
import socket
import struct
import sys
import time

ACK, RST = 0x10, 0x04
BATCH = 32  # packets in flight at once: the sandbox drops bursts beyond its socket buffer
ROUNDS = 3
ANSWER_TIMEOUT_S = 0.2

Flow = tuple[str, int, int]  # peer address, peer port, sandbox port


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _segment(sandbox: str, flow: Flow, seq: int, ack: int, flags: int) -> bytes:
    """An IPv4 TCP segment from the peer to the sandbox, checksummed."""
    peer, peer_port, sandbox_port = flow
    src, dst = socket.inet_aton(peer), socket.inet_aton(sandbox)
    tcp = struct.pack("!HHIIBBHHH", peer_port, sandbox_port, seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64,
                     socket.IPPROTO_TCP, 0, src, dst)  # fmt: skip
    return ip + tcp


class Sweeper:
    def __init__(self, sandbox: str, iface: str) -> None:
        self.sandbox = sandbox
        self.out = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        self.sniff.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sniff.bind((iface, 0x0800))
        self.sniff.setblocking(False)

    def _send(self, flow: Flow, seq: int, ack: int, flags: int) -> None:
        self.out.sendto(_segment(self.sandbox, flow, seq, ack, flags), (self.sandbox, 0))

    def _answers(self, flows: set[Flow], deadline: float) -> dict[Flow, tuple[int, int]]:
        """(flags, ack) of the first segment from the sandbox on each flow, until deadline."""
        got: dict[Flow, tuple[int, int]] = {}
        while flows - set(got):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sniff], [], [], left)[0]:
                break
            while True:
                try:
                    frame = self.sniff.recv(2048)
                except BlockingIOError:
                    break
                ip = frame[14:]
                if len(ip) < 40 or ip[9] != socket.IPPROTO_TCP:
                    continue
                if socket.inet_ntoa(ip[12:16]) != self.sandbox:
                    continue
                tcp = ip[(ip[0] & 0xF) * 4 :]
                sandbox_port, peer_port, _seq, ack = struct.unpack("!HHII", tcp[:12])
                flow = (socket.inet_ntoa(ip[16:20]), peer_port, sandbox_port)
                if flow in flows and flow not in got:
                    got[flow] = (tcp[13], ack)
        return got

    def probe(self, flows: list[Flow]) -> dict[Flow, tuple[int, int]]:
        """How the sandbox answers an unacceptable ACK on each flow; retried for silence."""
        got: dict[Flow, tuple[int, int]] = {}
        for _ in range(ROUNDS):
            todo = [f for f in flows if f not in got]
            for i in range(0, len(todo), BATCH):
                batch = todo[i : i + BATCH]
                for flow in batch:
                    self._send(flow, random.getrandbits(32), random.getrandbits(32), ACK)
                got.update(self._answers(set(batch), time.monotonic() + ANSWER_TIMEOUT_S))
        return got

    def sweep(self, flows: list[Flow]) -> tuple[int, list[Flow]]:
        """(how many live endpoints were reset, the flows still alive after that)."""
        found = -1
        for attempt in range(ROUNDS + 1):
            answers = self.probe(flows)
            # Silent ones count as alive: nothing proves they are gone.
            live = [f for f in flows if not answers.get(f, (0, 0))[0] & RST]
            found = len(live) if found < 0 else found
            if not live or attempt == ROUNDS:
                break
            for i in range(0, len(live), BATCH):
                for flow in live[i : i + BATCH]:
                    if flow in answers:  # a reset with the sequence number it expects
                        self._send(flow, answers[flow][1], 0, RST)
                time.sleep(0.005)
            time.sleep(0.02)
            flows = live
        return found - len(live), live


def main() -> None:
    request = json.load(sys.stdin)
    flows = [(str(p), int(pp), int(sp)) for p, pp, sp in request["flows"]]
    reset, left = Sweeper(request["sandbox"], request["iface"]).sweep(flows)
    json.dump({"reset": reset, "left": [list(f) for f in left]}, sys.stdout)


if __name__ == "__main__":
    main()
