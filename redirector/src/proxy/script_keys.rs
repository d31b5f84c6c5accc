//! Where a script that declares no keys must run. One Redis lets a script
//! touch any key; Redis Cluster refuses keys of other shards ("Script
//! attempted to access a non local key"). Many scripts name their keys as
//! string literals in `redis.call('get', 'counter')` without declaring
//! them: the proxy reads those literals and sends the script to the shard
//! that owns them, when they all share one. A key the script computes
//! (`'user:'..id`, a variable) cannot be known: the script then runs where
//! a keyless command runs, as before. Pure: text in, slot out.

use bytes::Bytes;

use crate::cluster::{commands::CommandTable, slot};

/// What the literal keys of a script say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScriptKeys {
    /// No call names a key: any node will do.
    None,
    /// Every key named is a literal, all in this slot.
    Slot(u16),
    /// Keys in several slots, or keys the script computes.
    Unknown,
}

/// The slot of the literal keys that `body` passes to `redis.call`,
/// `redis.pcall`, `server.call` and `server.pcall`.
pub fn script_keys(body: &[u8], table: &CommandTable) -> ScriptKeys {
    let mut found: Option<u16> = None;
    let mut rest = body;
    while let Some(at) = next_call(rest) {
        rest = &rest[at..];
        let Some((args, after)) = call_args(rest) else {
            return ScriptKeys::Unknown;
        };
        rest = after;
        // A call whose command the script computes may touch any key.
        let Some(Some(_)) = args.first() else {
            return ScriptKeys::Unknown;
        };
        let known: Vec<Bytes> = args.iter().map(|a| a.clone().unwrap_or_default()).collect();
        let Some(info) = table.lookup(&known) else {
            continue;
        };
        let keys = info
            .key_indices(&known)
            .or_else(|_| info.key_indices_partial(&known))
            .unwrap_or_default();
        for key in keys {
            let Some(Some(name)) = args.get(key) else {
                return ScriptKeys::Unknown;
            };
            let s = slot::slot(name);
            match found {
                Some(other) if other != s => return ScriptKeys::Unknown,
                _ => found = Some(s),
            }
        }
    }
    found.map_or(ScriptKeys::None, ScriptKeys::Slot)
}

/// The offset just past the `(` of the next `redis.call(`-like call.
fn next_call(text: &[u8]) -> Option<usize> {
    const CALLS: [&[u8]; 4] = [
        b"redis.call",
        b"redis.pcall",
        b"server.call",
        b"server.pcall",
    ];
    let mut from = 0;
    while from < text.len() {
        let (at, len) = CALLS
            .iter()
            .filter_map(|c| find(&text[from..], c).map(|i| (from + i, c.len())))
            .min_by_key(|(i, _)| *i)?;
        let mut i = at + len;
        while text.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if text.get(i) == Some(&b'(') {
            return Some(i + 1);
        }
        from = at + len;
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The arguments of a call up to its closing `)`: each a string literal's
/// bytes, or `None` for any other expression. The text after the call.
fn call_args(text: &[u8]) -> Option<(Vec<Option<Bytes>>, &[u8])> {
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while text.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if text.get(i) == Some(&b')') && args.is_empty() {
            return Some((args, &text[i + 1..]));
        }
        let start = i;
        let literal = literal(&text[i..]);
        // Skip the expression to the next `,` or `)` at this depth.
        let mut depth = 0usize;
        while let Some(&c) = text.get(i) {
            match c {
                b'\'' | b'"' => i += literal_len(&text[i..])?,
                b'(' | b'{' | b'[' => {
                    depth += 1;
                    i += 1;
                }
                b')' | b'}' | b']' if depth > 0 => {
                    depth -= 1;
                    i += 1;
                }
                b',' | b')' if depth == 0 => break,
                _ => i += 1,
            }
        }
        let end = text.get(i)?;
        // A literal only when the whole argument is one (not `'a'..b`).
        let whole = literal
            .as_ref()
            .is_some_and(|(_, len)| text[start + len..i].iter().all(u8::is_ascii_whitespace));
        args.push(if whole { literal.map(|(b, _)| b) } else { None });
        i += 1;
        if *end == b')' {
            return Some((args, &text[i..]));
        }
    }
}

/// A Lua short string literal at the start of `text`: its bytes (simple
/// escapes undone) and its length in the source.
fn literal(text: &[u8]) -> Option<(Bytes, usize)> {
    let quote = *text.first()?;
    if quote != b'\'' && quote != b'"' {
        return None;
    }
    let mut out = Vec::new();
    let mut i = 1;
    loop {
        match *text.get(i)? {
            c if c == quote => return Some((Bytes::from(out), i + 1)),
            b'\\' => {
                let c = *text.get(i + 1)?;
                out.push(match c {
                    b'n' => b'\n',
                    b't' => b'\t',
                    b'r' => b'\r',
                    b'\\' | b'\'' | b'"' => c,
                    // Numeric and other escapes: not a key we can read.
                    _ => return None,
                });
                i += 2;
            }
            b'\n' => return None,
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
}

/// The source length of the string literal at the start of `text`.
fn literal_len(text: &[u8]) -> Option<usize> {
    let quote = text[0];
    let mut i = 1;
    loop {
        match *text.get(i)? {
            c if c == quote => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// The functions a library registers (`redis.register_function('name', ...)`
/// or `redis.register_function{function_name='name', ...}`).
pub fn registered_functions(code: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = find(rest, b"register_function") {
        rest = &rest[at + b"register_function".len()..];
        let mut i = 0;
        while rest
            .get(i)
            .is_some_and(|c| c.is_ascii_whitespace() || *c == b'(' || *c == b'{')
        {
            i += 1;
        }
        let mut text = &rest[i..];
        if let Some(named) = text.strip_prefix(b"function_name") {
            let eq = named.iter().position(|&c| c == b'=').map_or(0, |p| p + 1);
            let named = &named[eq..];
            let ws = named.iter().take_while(|c| c.is_ascii_whitespace()).count();
            text = &named[ws..];
        }
        if let Some((name, _)) = literal(text) {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use bytes::BytesMut;
    use redis_protocol::resp2::decode::decode_bytes_mut;

    use super::*;

    static TABLE: LazyLock<CommandTable> = LazyLock::new(|| {
        let mut buf = BytesMut::from(&include_bytes!("../cluster/testdata/command-7.0.resp")[..]);
        let (frame, _, _) = decode_bytes_mut(&mut buf).unwrap().unwrap();
        CommandTable::from_command_reply(&frame).unwrap()
    });

    fn keys(body: &str) -> ScriptKeys {
        script_keys(body.as_bytes(), &TABLE)
    }

    #[test]
    fn literal_keys_name_their_slot() {
        let x = slot::slot(b"x");
        assert_eq!(keys("return redis.call('get', 'x')"), ScriptKeys::Slot(x));
        assert_eq!(
            keys("redis.call(\"set\",\"x\",1); return redis.pcall('incr', 'x')"),
            ScriptKeys::Slot(x)
        );
        assert_eq!(
            keys("server.call('mset', '{t}a', 1, '{t}b', ARGV[1])"),
            ScriptKeys::Slot(slot::slot(b"{t}a"))
        );
        // Keyless calls say nothing.
        assert_eq!(
            keys("redis.call('ping'); return redis.call('dbsize')"),
            ScriptKeys::None
        );
        assert_eq!(keys("return 1"), ScriptKeys::None);
    }

    #[test]
    fn computed_or_scattered_keys_are_unknown() {
        assert_eq!(keys("redis.call('get', 'a'..ARGV[1])"), ScriptKeys::Unknown);
        assert_eq!(
            keys("local k = 'x' redis.call('get', k)"),
            ScriptKeys::Unknown
        );
        assert_eq!(
            keys("redis.call('get', 'a') redis.call('get', 'b')"),
            ScriptKeys::Unknown,
            "a and b live in different slots"
        );
        assert_eq!(keys("redis.call(cmd, 'x')"), ScriptKeys::Unknown);
        // A call the scanner cannot close.
        assert_eq!(keys("redis.call('get', 'x'"), ScriptKeys::Unknown);
    }

    #[test]
    fn nested_expressions_and_quotes_do_not_end_an_argument() {
        let x = slot::slot(b"x");
        assert_eq!(
            keys("redis.call('set', 'x', tostring(math.max(1, 2)), 'EX', (\"1)\"))"),
            ScriptKeys::Slot(x)
        );
        assert_eq!(
            keys("redis.call('get', 'x\\'y')"),
            ScriptKeys::Slot(slot::slot(b"x'y"))
        );
    }

    #[test]
    fn libraries_name_their_functions() {
        let code = "#!lua name=lib\nredis.register_function('f1', function(keys, args) return 1 end)\nredis.register_function{function_name = \"f2\", callback = function() end, flags = {'no-writes'}}";
        assert_eq!(registered_functions(code.as_bytes()), ["f1", "f2"]);
    }
}
