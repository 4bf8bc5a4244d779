"""A TCP relay that a test (or a benchmark) can cut, standing for the network between an
agent and its LL: the agent dials the relay, the relay dials the LL's agent port.

- `cut()` resets the connections through it at once, all or only the data connections
  (those that did not open with HELLO): both ends see a reset, as when a NAT or a
  firewall forgets the flows. To a node a FIN would mean its peer let go on purpose.
- `refuse = True` resets new connections at once too (the leg is down for a while).
- `hold_data()` ... `release_data()`: a new data connection is held, unanswered, and
  relayed only on release.
- With `record=True`, `snapshot()` gives what crossed each connection, both ways (an
  attacker on the path).
- `accepts`: when each connection was passed on (time.monotonic()).
"""

from __future__ import annotations

import socket
import struct
import threading
import time

_LINGER_RESET = struct.pack("ii", 1, 0)
HELLO_TYPE = 1


class CuttableRelay:
    def __init__(self, upstream: tuple[str, int], *, record: bool = False) -> None:
        self.upstream = upstream
        self.record = record
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.addr: tuple[str, int] = self.listener.getsockname()[:2]
        self.refuse = False
        self.accepts: list[float] = []
        #: Per connection: (bytes sent by the agent, bytes sent by the LL), if recorded.
        self.legs: list[tuple[bytearray, bytearray]] = []
        self._live: dict[int, tuple[socket.socket, socket.socket]] = {}
        self._all: list[socket.socket] = []  # closed by stop(), whatever became of them
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._data_open = threading.Event()
        self._data_open.set()
        self._stopped = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def addr_str(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def hold_data(self) -> None:
        self._data_open.clear()

    def release_data(self) -> None:
        self._data_open.set()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return  # stop() shut the listener down
            with self._lock:
                if self._stopped:
                    _reset(down)
                    return
                self._all.append(down)
            if self.refuse:
                _reset(down)
                continue
            thread = threading.Thread(target=self._relay, args=(down,), daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _relay(self, down: socket.socket) -> None:
        if not self._data_open.is_set():
            down.settimeout(5)
            try:
                first = down.recv(1, socket.MSG_PEEK)
            except OSError:
                first = b""
            down.settimeout(None)
            if first != bytes([HELLO_TYPE]):
                self._data_open.wait(30)
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _reset(down)
            return
        up.settimeout(None)
        for sock in (down, up):
            # A router passes each segment on as it comes: without this, Nagle's
            # algorithm here and the peer's delayed ACK hold small writes ~40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent, answered = bytearray(), bytearray()
        with self._lock:
            self._all.append(up)
            if self._stopped:
                _reset(down)
                _reset(up)
                return
            index = len(self.legs)
            self.legs.append((sent, answered))
            self._live[index] = (down, up)
        self.accepts.append(time.monotonic())
        back = threading.Thread(target=self._pump, args=(up, down, answered, index))
        back.start()
        self._pump(down, up, sent, index)
        back.join()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray, index: int) -> None:
        try:
            while data := src.recv(1 << 16):
                if self.record:
                    with self._lock:
                        record += data
                dst.sendall(data)
            with self._lock:
                passed_on = index in self._live  # not when the relay is cutting it
            if passed_on:
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def snapshot(self) -> list[tuple[bytes, bytes]]:
        """(sent by the agent, sent by the LL) for every connection so far (`record`)."""
        with self._lock:
            return [(bytes(a), bytes(b)) for a, b in self.legs]

    def cut(self, *, data_only: bool = False) -> int:
        """Reset the connections relayed so far (only data connections if `data_only`,
        which needs `record`), both sides at once; returns how many."""
        with self._lock:
            chosen = [
                i for i in self._live if not data_only or self.legs[i][0][:1] != bytes([HELLO_TYPE])
            ]
            pairs = [self._live.pop(i) for i in chosen]
        for down, up in pairs:
            _reset(down)
            _reset(up)
        return len(pairs)

    def stop(self) -> None:
        self.release_data()
        with self._lock:
            self._stopped = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.listener.close()
        self._acceptor.join(10)
        self.cut()
        with self._lock:
            every, threads = list(self._all), list(self._threads)
        for thread in threads:
            thread.join(5)
        for sock in every:
            sock.close()


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        # Wakes a pump blocked in recv on it, and sends nothing: the close then resets
        # the connection (a FIN first would look like a clean end).
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()
