"""The inside UDP echo server: every datagram goes back whole to where it came from.

    python benchmarks/_udpecho.py                  # prints its port, runs until SIGTERM
    python benchmarks/_udpecho.py --port P         # one more worker on port P

A plain blocking socket in a tight loop: one `recvfrom` and one `sendto` per datagram,
no event loop, so the server costs as little CPU per datagram as Python allows and is
not what limits a measurement. Workers share a port with SO_REUSEPORT (the kernel
spreads flows over them by their addresses); the first one picks the port.
"""

from __future__ import annotations

import argparse
import socket

#: socket buffers (the kernel caps them at net.core.rmem_max / wmem_max): a burst
#: of a few thousand datagrams waits here instead of being dropped
BUFFER = 4 << 20


def serve(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    sock.bind(("127.0.0.1", port))
    print(sock.getsockname()[1], flush=True)
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, addr = recvfrom(65535)
        try:
            sendto(data, addr)
        except OSError:
            pass  # the client's port is gone (ECONNREFUSED from an ICMP error): next one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        serve(args.port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
