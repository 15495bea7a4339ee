"""User code doing at import what real projects do (an exporter thread that logs and flushes
all the time, a client connection opened at import): tasks forked from where it was imported
must neither deadlock nor lose the connection."""

from __future__ import annotations

import logging
import socket
import threading
import time

logger = logging.getLogger("user_code_at_import")
logger.addHandler(logging.NullHandler())
logger.propagate = False
logger.setLevel(logging.DEBUG)


def _exporter() -> None:
    while True:  # takes the logging locks all the time, as a busy exporter would
        logger.debug("exporting")
        time.sleep(0.0005)


threading.Thread(target=_exporter, daemon=True, name="user-exporter").start()

_server, _client = socket.socketpair()  # a connection opened at import


def peer_alive() -> bool:
    _client.sendall(b"x")
    return _server.recv(1) == b"x"
