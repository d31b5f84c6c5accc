//! Configs that belong to the server a client talks to, not to the data:
//! `port` is the proxy's own listening port, as INFO's `tcp_port` is. A
//! `CONFIG GET` shows the proxy's port, and a `CONFIG SET port` to that
//! same value is a no-op; setting every node's port to one value would
//! move them all onto one port. Pure.

use bytes::Bytes;

use crate::resp::{reply, value::Value};

/// `CONFIG SET`'s arguments with the proxy's own configs taken out:
/// `Ok(Some(args))` to forward, `Ok(None)` when nothing is left (the
/// answer is `+OK`), or the error reply for a value the proxy cannot take.
pub fn strip_own_set(args: &[Bytes], port: u16) -> Result<Option<Vec<Bytes>>, Bytes> {
    let Some(pairs) = args.get(2..) else {
        return Ok(Some(args.to_vec()));
    };
    if pairs.len() % 2 != 0 || !pairs.chunks_exact(2).any(|p| is_port(&p[0])) {
        return Ok(Some(args.to_vec()));
    }
    let mut kept = args[..2].to_vec();
    for pair in pairs.chunks_exact(2) {
        if !is_port(&pair[0]) {
            kept.extend_from_slice(pair);
        } else if pair[1] != port.to_string().as_bytes() {
            return Err(reply::error(
                "ERR CONFIG SET failed (possibly related to argument 'port') - Unable to listen on this port: redirector keeps its own (--listen)",
            ));
        }
    }
    Ok((kept.len() > 2).then_some(kept))
}

fn is_port(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"port")
}

/// A `CONFIG GET` reply (name/value pairs, flat in RESP2 or a RESP3 map)
/// with the proxy's own values.
pub fn rewrite_get(reply: Value, port: u16) -> Value {
    let own = |name: &Value, value: Value| {
        if name.as_bytes().is_some_and(is_port) {
            Value::Bulk(Bytes::from(port.to_string()))
        } else {
            value
        }
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
    fn config_get_shows_the_proxys_port() {
        let bulk = |s: &str| Value::Bulk(Bytes::copy_from_slice(s.as_bytes()));
        let flat = Value::Array(vec![
            bulk("maxmemory"),
            bulk("0"),
            bulk("port"),
            bulk("7000"),
        ]);
        assert_eq!(
            rewrite_get(flat, 15379),
            Value::Array(vec![
                bulk("maxmemory"),
                bulk("0"),
                bulk("port"),
                bulk("15379")
            ])
        );
        let map = Value::Map(vec![(bulk("port"), bulk("7000"))]);
        assert_eq!(
            rewrite_get(map, 15379),
            Value::Map(vec![(bulk("port"), bulk("15379"))])
        );
    }
}
