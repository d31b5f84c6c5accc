//! Configs that belong to the server a client talks to, not to the data.
//!
//! - `port` is the proxy's own listening port, as INFO's `tcp_port` is. A
//!   `CONFIG GET` shows the proxy's port, and a `CONFIG SET port` to that
//!   same value is a no-op; setting every node's port to one value would
//!   move them all onto one port.
//! - `client-output-buffer-limit` bounds what the proxy holds for its own
//!   clients (`output_limit`). Set on the nodes, it would bound the
//!   proxy's pooled connections instead, which carry many clients' replies:
//!   a node would cut one as soon as their pipelines together owed more
//!   than one client may, failing every client on it. The proxy checks the
//!   value with Redis's rules and words and keeps it; the nodes keep
//!   theirs.
//!
//! Pure.

use bytes::Bytes;

use super::output_limit::OutputLimits;
use crate::resp::{reply, value::Value};

const OUTPUT_LIMIT: &[u8] = b"client-output-buffer-limit";

/// The proxy's own values, as a client of it sees them.
pub struct Own {
    pub port: u16,
    pub output_limits: OutputLimits,
}

/// `CONFIG SET`'s arguments with the proxy's own configs taken out:
/// `Ok(Some(args))` to forward, `Ok(None)` when nothing is left (the
/// answer is `+OK`), or the error reply for a value the proxy cannot take.
/// A `client-output-buffer-limit` it returns `Ok` for is valid: the caller
/// keeps it once the rest is accepted (`LiveLimits::configured`).
pub fn strip_own_set(args: &[Bytes], port: u16) -> Result<Option<Vec<Bytes>>, Bytes> {
    let Some(pairs) = args.get(2..) else {
        return Ok(Some(args.to_vec()));
    };
    if pairs.len() % 2 != 0 || !pairs.chunks_exact(2).any(|p| is_own(&p[0])) {
        return Ok(Some(args.to_vec()));
    }
    let mut kept = args[..2].to_vec();
    for pair in pairs.chunks_exact(2) {
        if !is_own(&pair[0]) {
            kept.extend_from_slice(pair);
        } else if is_port(&pair[0]) {
            if pair[1] != port.to_string().as_bytes() {
                return Err(reply::error(
                    "ERR CONFIG SET failed (possibly related to argument 'port') - Unable to listen on this port: redirector keeps its own (--listen)",
                ));
            }
        } else if let Err(e) = std::str::from_utf8(&pair[1])
            .map_err(|_| super::output_limit::ParseError::Arguments)
            .and_then(|value| OutputLimits::default().with(value))
        {
            // Redis's reply (config.c, `configSetCommand`).
            return Err(reply::error(&format!(
                "ERR CONFIG SET failed (possibly related to argument 'client-output-buffer-limit') - {e}"
            )));
        }
    }
    Ok((kept.len() > 2).then_some(kept))
}

fn is_own(name: &[u8]) -> bool {
    is_port(name) || name.eq_ignore_ascii_case(OUTPUT_LIMIT)
}

fn is_port(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"port")
}

/// A `CONFIG GET` reply (name/value pairs, flat in RESP2 or a RESP3 map)
/// with the proxy's own values.
pub fn rewrite_get(reply: Value, own: &Own) -> Value {
    let own = |name: &Value, value: Value| match name.as_bytes() {
        Some(name) if is_port(name) => Value::Bulk(Bytes::from(own.port.to_string())),
        Some(name) if name.eq_ignore_ascii_case(OUTPUT_LIMIT) => {
            Value::Bulk(Bytes::from(own.output_limits.to_string()))
        }
        _ => value,
    };
    match reply {
        Value::Map(pairs) => Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| {
                    let v = own(&k, v);
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            let mut items = items.into_iter();
            while let Some(name) = items.next() {
                let Some(value) = items.next() else {
                    out.push(name);
                    break;
                };
                let value = own(&name, value);
                out.push(name);
                out.push(value);
            }
            Value::Array(out)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_args as args;

    #[test]
    fn setting_the_proxys_own_port_to_itself_is_a_no_op() {
        assert_eq!(
            strip_own_set(&args(&["config", "set", "port", "15379"]), 15379),
            Ok(None)
        );
        assert_eq!(
            strip_own_set(
                &args(&["config", "set", "PORT", "15379", "maxmemory", "0"]),
                15379
            ),
            Ok(Some(args(&["config", "set", "maxmemory", "0"])))
        );
        assert!(strip_own_set(&args(&["config", "set", "port", "6380"]), 15379).is_err());
        assert_eq!(
            strip_own_set(&args(&["config", "set", "maxmemory", "0"]), 15379),
            Ok(Some(args(&["config", "set", "maxmemory", "0"])))
        );
    }

    #[test]
    fn output_limits_are_checked_and_kept_by_the_proxy_not_sent_to_the_nodes() {
        let set = args(&[
            "config",
            "set",
            "client-output-buffer-limit",
            "normal 1mb 0 0",
            "maxmemory",
            "0",
        ]);
        assert_eq!(
            strip_own_set(&set, 15379),
            Ok(Some(args(&["config", "set", "maxmemory", "0"])))
        );
        assert_eq!(
            strip_own_set(
                &args(&[
                    "config",
                    "set",
                    "CLIENT-OUTPUT-BUFFER-LIMIT",
                    "pubsub 0 0 0"
                ]),
                15379
            ),
            Ok(None)
        );
        assert_eq!(
            strip_own_set(
                &args(&["config", "set", "client-output-buffer-limit", "normal 1mbs 0 0"]),
                15379
            ),
            Err(Bytes::from_static(
                b"-ERR CONFIG SET failed (possibly related to argument 'client-output-buffer-limit') - Error in hard, soft or soft_seconds setting in buffer limit configuration.\r\n"
            ))
        );
    }

    #[test]
    fn config_get_shows_the_proxys_port() {
        let bulk = |s: &str| Value::Bulk(Bytes::copy_from_slice(s.as_bytes()));
        let flat = Value::Array(vec![
            bulk("maxmemory"),
            bulk("0"),
            bulk("port"),
            bulk("7000"),
        ]);
        let own = Own {
            port: 15379,
            output_limits: OutputLimits::default(),
        };
        assert_eq!(
            rewrite_get(flat, &own),
            Value::Array(vec![
                bulk("maxmemory"),
                bulk("0"),
                bulk("port"),
                bulk("15379")
            ])
        );
        let map = Value::Map(vec![(bulk("port"), bulk("7000"))]);
        assert_eq!(
            rewrite_get(map, &own),
            Value::Map(vec![(bulk("port"), bulk("15379"))])
        );
        let limits = Value::Array(vec![
            bulk("client-output-buffer-limit"),
            bulk("normal 1 2 3 slave 0 0 0 pubsub 0 0 0"),
        ]);
        assert_eq!(
            rewrite_get(limits, &own),
            Value::Array(vec![
                bulk("client-output-buffer-limit"),
                bulk("normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60"),
            ])
        );
    }
}
