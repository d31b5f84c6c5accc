"""redis-py (Debian's python3-redis) through the redirector proxy.

Usage: /usr/bin/python3 redis_py.py HOST PORT

The proxy must look like one standalone Redis to `redis.Redis` and like a
one-node cluster to `redis.cluster.RedisCluster`. Exits non-zero with a
message on the first mismatch; prints one line per check that passed.
"""

import sys
import time

import redis
import redis.cluster


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def expect(what, got, want):
    if got != want:
        fail(f"{what}: got {got!r}, want {want!r}")


def ok(msg):
    print(f"ok: {msg}", flush=True)


def plain(host, port):
    r = redis.Redis(host=host, port=port, socket_timeout=10)
    expect("PING", r.ping(), True)

    # 1000 keys, spread over every master by their names.
    keys = [f"py:plain:{i}" for i in range(1000)]
    for i, k in enumerate(keys):
        expect(f"SET {k}", r.set(k, f"v{i}"), True)
    for i, k in enumerate(keys):
        expect(f"GET {k}", r.get(k), f"v{i}".encode())
    ok("set/get 1000 keys")

    # A non-transactional pipeline: 100 commands, replies in order.
    pipe = r.pipeline(transaction=False)
    for i in range(50):
        pipe.set(f"py:pipe:{i}", i)
    for i in range(50):
        pipe.incrby(f"py:pipe:{i}", 1000)
    replies = pipe.execute()
    expect("pipeline reply count", len(replies), 100)
    expect("pipeline SET replies", replies[:50], [True] * 50)
    expect("pipeline INCRBY replies", replies[50:], [1000 + i for i in range(50)])
    for i in range(50):
        expect(f"after pipeline GET py:pipe:{i}", r.get(f"py:pipe:{i}"), str(1000 + i).encode())
    ok("pipeline (transaction=False) of 100 commands")

    # MULTI/EXEC on keys sharing a hash tag (one slot).
    tx = r.pipeline(transaction=True)
    tx.set("{py:tx}:a", "1")
    tx.incr("{py:tx}:a")
    tx.rpush("{py:tx}:list", "x", "y")
    tx.get("{py:tx}:a")
    tx.lrange("{py:tx}:list", 0, -1)
    expect("MULTI/EXEC replies", tx.execute(), [True, 2, 2, b"2", [b"x", b"y"]])
    expect("after EXEC GET", r.get("{py:tx}:a"), b"2")
    ok("MULTI/EXEC pipeline on one hash tag")

    # Pub/sub: subscriber on one connection, publisher on another.
    sub_client = redis.Redis(host=host, port=port, socket_timeout=10)
    ps = sub_client.pubsub()
    ps.subscribe("py:chan")
    msg = ps.get_message(timeout=5)
    if msg is None or msg["type"] != "subscribe":
        fail(f"subscribe confirmation: got {msg!r}")
    expect("subscribe confirmation channel", msg["channel"], b"py:chan")
    received = None
    deadline = time.monotonic() + 10
    while received is None and time.monotonic() < deadline:
        receivers = r.publish("py:chan", "hello")
        if receivers < 0:
            fail(f"PUBLISH returned {receivers}")
        msg = ps.get_message(timeout=1)
        if msg is not None:
            received = msg
    if received is None:
        fail("no message on py:chan within 10 s")
    expect("message type", received["type"], "message")
    expect("message channel", received["channel"], b"py:chan")
    expect("message data", received["data"], b"hello")
    ps.unsubscribe("py:chan")
    ps.close()
    sub_client.close()
    # The publishing connection still works normally.
    expect("PING after pub/sub", r.ping(), True)
    ok("pub/sub: message received")

    # SCAN across the whole cluster: every key exactly once.
    seen = list(r.scan_iter(match="py:plain:*", count=100))
    dupes = len(seen) - len(set(seen))
    if dupes:
        fail(f"scan_iter returned {dupes} duplicate keys")
    want = {k.encode() for k in keys}
    missing = want - set(seen)
    extra = set(seen) - want
    if missing or extra:
        fail(
            f"scan_iter: {len(missing)} keys missing (e.g. {sorted(missing)[:3]}), "
            f"{len(extra)} unexpected (e.g. {sorted(extra)[:3]})"
        )
    ok(f"scan_iter returned all {len(seen)} keys exactly once")
    r.close()


def cluster(host, port):
    rc = redis.cluster.RedisCluster(host=host, port=port, socket_timeout=10)
    nodes = rc.get_nodes()
    if len(nodes) != 1:
        fail(f"RedisCluster sees {len(nodes)} nodes: {[n.name for n in nodes]}")
    expect("the one node's port", int(nodes[0].port), port)
    ok(f"RedisCluster sees one node: {nodes[0].name}")

    keys = [f"py:cluster:{i}" for i in range(200)]
    for i, k in enumerate(keys):
        expect(f"cluster SET {k}", rc.set(k, f"c{i}"), True)
    for i, k in enumerate(keys):
        expect(f"cluster GET {k}", rc.get(k), f"c{i}".encode())
    expect(
        "mget_nonatomic",
        rc.mget_nonatomic(keys),
        [f"c{i}".encode() for i in range(200)],
    )
    # Keys the plain client wrote are visible to the cluster client.
    expect("cluster GET of a plain key", rc.get("py:plain:7"), b"v7")
    ok("RedisCluster set/get/mget_nonatomic across slots")
    rc.close()


def main():
    if len(sys.argv) != 3:
        fail("usage: redis_py.py HOST PORT")
    host, port = sys.argv[1], int(sys.argv[2])
    print(f"redis-py {redis.__version__} against {host}:{port}", flush=True)
    try:
        plain(host, port)
        cluster(host, port)
    except redis.exceptions.RedisError as e:
        fail(f"{type(e).__name__}: {e}")
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
