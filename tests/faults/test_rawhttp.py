"""The raw HTTP client the input-abuse tests send with."""

from __future__ import annotations

import socket
import threading

from faults.rawhttp import send_raw

ANSWER = b"HTTP/1.1 431 Too Large\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno"


def test_a_response_followed_by_a_reset_is_read_whole() -> None:
    """A server refusing a request it read only part of closes with bytes unread: the kernel
    resets the connection, and the response that came first is still the answer."""
    with socket.create_server(("127.0.0.1", 0)) as server:

        def refuse() -> None:
            connection, _ = server.accept()
            with connection:
                connection.recv(1000)
                connection.sendall(ANSWER)
            # Closed with most of the request unread: the kernel sends a reset.

        thread = threading.Thread(target=refuse)
        thread.start()
        response = send_raw(server.getsockname()[1], b"GET / HTTP/1.1\r\nX: " + b"a" * 200_000)
        thread.join()
    assert (response.status, response.body) == (431, b"no")
