<?php
// phpredis load that runs until a stop file appears, for the upgrade test.
//
// Usage: php phpredis_through_upgrade.php MODE HOST PORT STOPFILE
//   per-request  PHP-FPM style: connect, SET, GET, INCR, close, again
//   pipeline     one long-lived connection, 16 SET+GET pairs per pipeline
//   pconnect     a persistent connection used once every 1.5 s, as an
//                idle PHP-FPM worker does between requests; phpredis checks
//                a reused persistent connection with ECHO and reconnects
//                when the server closed it
//
// Fails (exit 1, "FAIL: ...") at the first error or wrong reply. On success
// prints "requests: N" and, one per line, "proxy: PID" for each proxy
// process (INFO server's process_id) that served it, in order.

function fail(string $msg): void {
    fwrite(STDOUT, "FAIL: $msg\n");
    exit(1);
}

if ($argc !== 5) {
    fail("usage: phpredis_through_upgrade.php MODE HOST PORT STOPFILE");
}
if (!extension_loaded("redis")) {
    fail("the redis extension is not loaded (apt-get install php-redis)");
}
[$mode, $host, $port, $stop] = [$argv[1], $argv[2], (int)$argv[3], $argv[4]];
$run = getmypid();
$done = 0;
$proxies = [];

function served_by(Redis $r, array &$proxies): void {
    $pid = $r->info("server")["process_id"] ?? "none";
    if (end($proxies) !== $pid) {
        $proxies[] = $pid;
    }
}

try {
    switch ($mode) {
    case "per-request":
        $counter = "upgrade:$run:counter";
        while (!file_exists($stop)) {
            $r = new Redis();
            if (!$r->connect($host, $port, 5.0)) {
                fail("request $done: connect failed");
            }
            $r->setOption(Redis::OPT_READ_TIMEOUT, 5.0);
            $key = "upgrade:$run:req:$done";
            $value = "value-$done";
            if ($r->set($key, $value) !== true) {
                fail("request $done: SET failed");
            }
            if (($got = $r->get($key)) !== $value) {
                fail("request $done: GET returned " . var_export($got, true));
            }
            if (($n = $r->incr($counter)) !== $done + 1) {
                fail("request $done: INCR returned " . var_export($n, true));
            }
            if ($done % 50 === 0) {
                served_by($r, $proxies);
            }
            $r->close();
            $done++;
        }
        break;
    case "pipeline":
        $r = new Redis();
        if (!$r->connect($host, $port, 5.0)) {
            fail("connect failed");
        }
        $r->setOption(Redis::OPT_READ_TIMEOUT, 5.0);
        served_by($r, $proxies);
        $batch = 0;
        while (!file_exists($stop)) {
            $p = $r->multi(Redis::PIPELINE);
            for ($i = 0; $i < 16; $i++) {
                $p->set("upgrade:$run:pipe:$i", "v$batch-$i");
                $p->get("upgrade:$run:pipe:$i");
            }
            $replies = $p->exec();
            if (!is_array($replies) || count($replies) !== 32) {
                fail("batch $batch: pipeline returned " . var_export($replies, true));
            }
            for ($i = 0; $i < 16; $i++) {
                if ($replies[2 * $i] !== true || $replies[2 * $i + 1] !== "v$batch-$i") {
                    fail("batch $batch, pair $i: " . var_export(array_slice($replies, 2 * $i, 2), true));
                }
            }
            $done += 32;
            $batch++;
        }
        served_by($r, $proxies);
        break;
    case "pconnect":
        while (!file_exists($stop)) {
            $r = new Redis();
            if (!$r->pconnect($host, $port, 5.0, "upgrade")) {
                fail("request $done: pconnect failed");
            }
            $r->setOption(Redis::OPT_READ_TIMEOUT, 5.0);
            $key = "upgrade:$run:p:$done";
            if ($r->set($key, "p$done") !== true || $r->get($key) !== "p$done") {
                fail("request $done: SET/GET failed");
            }
            served_by($r, $proxies);
            $done++;
            usleep(1500000);
        }
        break;
    default:
        fail("unknown mode $mode");
    }
} catch (RedisException $e) {
    fail("$mode after $done requests: RedisException: " . $e->getMessage());
}

echo "requests: $done\n";
foreach ($proxies as $pid) {
    echo "proxy: $pid\n";
}
