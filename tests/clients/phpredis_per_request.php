<?php
// phpredis through the redirector proxy, the way PHP-FPM uses it: every
// "request" opens a fresh connection, runs a few commands and closes it.
//
// Usage: php phpredis_per_request.php HOST PORT REQUESTS
// Exits non-zero with a message on the first mismatch; on success prints
// "requests: N".

function fail(string $msg): void {
    fwrite(STDOUT, "FAIL: $msg\n");
    exit(1);
}

if ($argc !== 4) {
    fail("usage: phpredis_per_request.php HOST PORT REQUESTS");
}
if (!extension_loaded("redis")) {
    fail("the redis extension is not loaded (apt-get install php-redis)");
}
[$host, $port, $requests] = [$argv[1], (int)$argv[2], (int)$argv[3]];
$run = getmypid();
$counter = "php:$run:counter";
$done = 0;

try {
    for ($i = 0; $i < $requests; $i++) {
        $r = new Redis();
        if (!$r->connect($host, $port, 5.0)) {
            fail("request $i: connect failed");
        }
        $r->setOption(Redis::OPT_READ_TIMEOUT, 5.0);
        $key = "php:$run:req:$i";
        $value = "value-$i-" . str_repeat("x", $i % 64);
        $set = $r->set($key, $value);
        if ($set !== true) {
            fail("request $i: SET $key returned " . var_export($set, true));
        }
        $got = $r->get($key);
        if ($got !== $value) {
            fail("request $i: GET $key returned " . var_export($got, true) . ", want '$value'");
        }
        $n = $r->incr($counter);
        if ($n !== $i + 1) {
            fail("request $i: INCR $counter returned " . var_export($n, true) . ", want " . ($i + 1));
        }
        if (!$r->close()) {
            fail("request $i: close failed");
        }
        $done++;
    }
    // One more connection reads everything back.
    $r = new Redis();
    $r->connect($host, $port, 5.0);
    $keys = [];
    for ($i = 0; $i < $requests; $i++) {
        $keys[] = "php:$run:req:$i";
    }
    $values = $r->mget($keys);
    for ($i = 0; $i < $requests; $i++) {
        $want = "value-$i-" . str_repeat("x", $i % 64);
        if ($values[$i] !== $want) {
            fail("MGET position $i: " . var_export($values[$i], true) . ", want '$want'");
        }
    }
    $total = $r->get($counter);
    if ($total !== (string)$requests) {
        fail("final counter " . var_export($total, true) . ", want $requests");
    }
    $r->close();
} catch (RedisException $e) {
    fail("after $done requests: RedisException: " . $e->getMessage());
}

echo "requests: $done\n";
