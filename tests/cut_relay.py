"""A TCP relay that a test can cut, standing for the network between an agent and its
LL: the agent dials the relay, the relay dials the LL's agent port. `cut()` resets every
connection through it at once (both ends see a reset, as when a NAT or a firewall
forgets the flows); `refuse = True` resets new connections at once too (the leg is
down for a while)."""

from __future__ import annotations

import socket
import struct
import threading

_LINGER_RESET = struct.pack("ii", 1, 0)


class CuttableRelay:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr: tuple[str, int] = self.listener.getsockname()[:2]
        self.refuse = False
        self.accepted = 0
        self._lock = threading.Lock()
        self._live: list[socket.socket] = []
        self._all: list[socket.socket] = []  # closed by stop(), whatever happened to them
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def addr_str(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            with self._lock:
                self._all.append(down)
            if self.refuse:
                _reset(down)
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(down)
                continue
            up.settimeout(None)
            for sock in (down, up):  # as the nodes do: no Nagle delay on small records
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._live += [down, up]
                self._all.append(up)
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            with self._lock:
                passed_on = dst in self._live  # not when the relay is cutting it
            if passed_on:
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> int:
        """Reset every connection through the relay now; how many there were."""
        with self._lock:
            live, self._live = self._live, []
        for sock in live:
            _reset(sock)
        return len(live) // 2

    def stop(self) -> None:
        self._stopped = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._thread.join(10)
        self.listener.close()
        self.cut()
        with self._lock:
            every, self._all = self._all, []
        for sock in every:
            sock.close()


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    try:
        # Wakes a thread blocked in recv on it, and sends nothing: the close then
        # resets the connection (a FIN first would look like a clean end).
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()
