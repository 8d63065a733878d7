"""A tiny threaded TCP proxy for fault tests: put it in front of a node and switch its mode.

    proxy = TcpProxy(("127.0.0.1", node_port))          # listens on a free loopback port
    proxy.start()
    proxy.mode = "drop"     # blackhole: accept and hold connections, forward nothing
    proxy.mode = "delay"    # forward, sleeping ``delay`` seconds before each chunk of data
    proxy.mode = "reset"    # close every connection abruptly (RST), new ones at once
    proxy.mode = "pass"     # forward as they are
    proxy.stop()            # closes everything; every thread is a daemon and is joined

Switching to ``drop`` or ``reset`` also cuts the connections that are open (``reset``
resets them, ``drop`` stops forwarding on them), so a client that keeps a channel open sees the
fault at once, as it would see a partition. Only loopback is ever contacted.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

MODES = ("pass", "drop", "delay", "reset")
_BUFFER = 64 * 1024
_POLL = 0.05  # seconds between checks of the mode and of stop()


class TcpProxy:
    def __init__(
        self,
        target: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        delay: float = 0.2,
    ) -> None:
        self.target = target
        self.delay = delay
        self._mode = "pass"
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(listen)
        self._server.listen(64)
        self._server.settimeout(_POLL)
        self.address = "{}:{}".format(*self._server.getsockname())
        self.port = self._server.getsockname()[1]
        self.connections = 0  # accepted so far

    # mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r} (one of {', '.join(MODES)})")
        self._mode = mode
        if mode == "reset":
            self._reset_all()

    # life cycle

    def start(self) -> TcpProxy:
        self._spawn(self._accept_loop, "proxy-accept")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listening socket and every connection; join every thread."""
        self._stopping.set()
        self._reset_all()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._server.close()
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"proxy threads still running after {timeout} s: {alive}")

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # internals

    def _spawn(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        sock.close()

    def _reset_all(self) -> None:
        with self._lock:
            socks = list(self._sockets)
        for sock in socks:
            _abort(sock)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            if self._mode == "reset":
                _abort(client)
                client.close()
                continue
            self._track(client)
            self._spawn(self._serve, "proxy-conn", client)

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            while self._mode == "drop" and not self._stopping.is_set():
                time.sleep(_POLL)  # blackhole: hold the connection, read and send nothing
            if self._stopping.is_set() or self._mode == "reset":
                return
            upstream = socket.create_connection(self.target, timeout=5)
            self._track(upstream)
            self._pump(client, upstream)
        except OSError:
            pass
        finally:
            self._forget(client)
            if upstream is not None:
                self._forget(upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        while not self._stopping.is_set():
            mode = self._mode
            if mode == "reset":
                return
            if mode == "drop":
                time.sleep(_POLL)  # a partition: hold both ends, move nothing
                continue
            readable, _, _ = select.select(list(peers), [], [], _POLL)
            for sock in readable:
                data = sock.recv(_BUFFER)
                if not data:
                    return
                if self._mode == "delay":
                    time.sleep(self.delay)
                peers[sock].sendall(data)


def _abort(sock: socket.socket) -> None:
    """Make the socket's close send RST instead of FIN, and shut it down."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
