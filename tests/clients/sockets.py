"""Raw socket behaviours of pod processes that the node tests need and no
Redis client produces: many connects that never establish, many idle
connections held open, a socket carrying a chosen mark, a connect from a
socket bound to loopback first.

Usage: /usr/bin/python3 sockets.py COMMAND HOST PORT [ARG]

  flood HOST PORT N      N non-blocking connects, each closed at once
                         (before any handshake can finish); prints
                         "started N" and the errno histogram.
  hold HOST PORT N       opens N connections and PINGs on each; prints
                         "held K refused R" (R: replies that were errors),
                         then keeps them open until stdin closes.
  marked HOST PORT MARK  sets SO_MARK=MARK, connects, sends INFO server and
                         prints the reply.
  bound HOST PORT        binds the socket to 127.0.0.1 first, connects,
                         PINGs, prints the reply.
  cookie                 prints this network namespace's cookie
                         (SO_NETNS_COOKIE), as the kernel programs see it.
"""

import collections
import errno
import socket
import sys

SO_MARK = 36
SO_NETNS_COOKIE = 71
PING = b"*1\r\n$4\r\nPING\r\n"
INFO_SERVER = b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n"


def read_reply(sock):
    """One RESP reply (a simple line, or a bulk string read whole)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    if data.startswith(b"$"):
        header, _, rest = data.partition(b"\r\n")
        need = int(header[1:]) + 2
        while len(rest) < need:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return header + b"\r\n" + rest
    return data


def flood(host, port, n):
    outcomes = collections.Counter()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        code = s.connect_ex((host, port))
        outcomes[errno.errorcode.get(code, str(code))] += 1
        s.close()
    print(f"started {n} {dict(outcomes)}", flush=True)


def hold(host, port, n):
    held, refused, socks = 0, 0, []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(PING)
        reply = read_reply(s)
        if reply.startswith(b"+PONG"):
            held += 1
            socks.append(s)
        else:
            refused += 1
            s.close()
    print(f"held {held} refused {refused}", flush=True)
    sys.stdin.read()


def marked(host, port, mark):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    s.settimeout(10)
    s.connect((host, port))
    s.sendall(INFO_SERVER)
    sys.stdout.write(read_reply(s).decode(errors="replace"))


def bound(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(10)
    s.connect((host, port))
    s.sendall(PING)
    sys.stdout.write(read_reply(s).decode(errors="replace"))


def main():
    if sys.argv[1] == "cookie":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        print(int.from_bytes(raw, "little"))
        return
    command, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if command == "flood":
        flood(host, port, int(sys.argv[4]))
    elif command == "hold":
        hold(host, port, int(sys.argv[4]))
    elif command == "marked":
        marked(host, port, int(sys.argv[4], 0))
    elif command == "bound":
        bound(host, port)
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
