#!/usr/bin/env bash
# bench/proxy-listeners.sh: why a route has one listener and one acceptor rather than one
# SO_REUSEPORT listener per thread. Queues CLIENTS connections (each with a request sent) on
# two SO_REUSEPORT listeners of one port, accepts none, closes one listener, and counts how
# many reach the other and how many are reset; then does the same with one listening socket
# held by two descriptors (what `Route::take_over` does) and closes one descriptor.
#
# Usage: bench/proxy-listeners.sh      (CLIENTS=200 by default)
set -euo pipefail
echo "net.ipv4.tcp_migrate_req = $(cat /proc/sys/net/ipv4/tcp_migrate_req)"
CLIENTS=${CLIENTS:-200} python3 - <<'PY'
import os, socket

clients = int(os.environ["CLIENTS"])

def listener(port=0, reuseport=False):
    sock = socket.socket()
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    return sock

def queue(port):
    queued = []
    for _ in range(clients):
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        queued.append(client)
    return queued

def drain(sock):
    sock.setblocking(False)
    kept = []
    while True:
        try:
            kept.append(sock.accept())
        except BlockingIOError:
            return kept

def resets(queued):
    count = 0
    for client in queued:
        client.settimeout(0.2)
        try:
            if client.recv(1) == b"":
                count += 1
        except ConnectionResetError:
            count += 1
        except socket.timeout:
            pass
    return count

first = listener(reuseport=True)
port = first.getsockname()[1]
second = listener(port, reuseport=True)
queued = queue(port)
first.close()
kept = drain(second)
print(f"SO_REUSEPORT, two listeners, one closed: {clients} queued, {len(kept)} reached the other, {resets(queued)} reset")

first = listener()
port = first.getsockname()[1]
second = socket.socket(fileno=os.dup(first.fileno()))
queued = queue(port)
first.close()
kept = drain(second)
print(f"one listener, two descriptors, one closed: {clients} queued, {len(kept)} reached the other, {resets(queued)} reset")
PY
