"""The send timeout: a client that takes none of its answer's bytes for
``send_timeout_s`` is dropped (nginx's ``send_timeout``), so a client that
asks and never reads cannot hold a connection, a handler and the upstream
connection behind it for good.

Progress is what the client takes, not what the server writes: watched while
the transport's buffer is over its high-water mark and while a file is handed
to ``sendfile``, which bypasses that buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
from collections.abc import Callable
from typing import Final

CHECKS: Final = 4  # progress checks per timeout: a drop within 1.25 timeouts of the last byte
_TCP_INFO: Final = getattr(socket, "TCP_INFO", None)
_BYTES_ACKED: Final = slice(120, 128)  # tcpi_bytes_acked in Linux's struct tcp_info
_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets


class SendWatch:
    """Calls ``expired`` once the client has taken nothing for ``timeout_s``
    while watched (``watch`` .. ``unwatch``)."""

    __slots__ = ("_expired", "_loop", "_mark", "_progress_at", "_timer", "_transport", "timeout_s")

    def __init__(
        self, transport: asyncio.Transport, timeout_s: float, expired: Callable[[], None]
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = transport
        self._expired = expired
        self.timeout_s = timeout_s
        self._timer: asyncio.TimerHandle | None = None
        self._mark = 0
        self._progress_at = 0.0

    def watch(self) -> None:
        if self._timer is None:
            self._mark = self._taken()
            self._progress_at = self._loop.time()
            self._arm()

    def unwatch(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _arm(self) -> None:
        self._timer = self._loop.call_later(self.timeout_s / CHECKS, self._check)

    def _check(self) -> None:
        self._timer = None
        taken, now = self._taken(), self._loop.time()
        if taken > self._mark:
            self._mark, self._progress_at = taken, now  # slow, but taking bytes
        # (uvloop's timers have millisecond steps and may fire a little early)
        if now - self._progress_at < self.timeout_s - 0.002:
            self._arm()
        else:
            self._expired()

    def _taken(self) -> int:
        """Grows while the client takes bytes: what it acknowledged (Linux's
        TCP_INFO; it also covers sendfile) less what still waits in the
        transport's buffer. Over TLS the transport still gives the TCP
        socket: what it counts is ciphertext, which grows just as well."""
        acked = 0
        sock = self._transport.get_extra_info("socket")
        if _TCP_INFO is not None and sock is not None:
            try:
                info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 232)
            except OSError:
                info = b""
            acked = int.from_bytes(info[_BYTES_ACKED], sys.byteorder)
        return acked - self._transport.get_write_buffer_size()

    def reset_on_close(self) -> None:
        """Make the transport's close a reset, not a FIN queued behind megabytes
        the client will never read: the kernel frees the socket's buffers at
        once (nginx's ``reset_timedout_connection``)."""
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
