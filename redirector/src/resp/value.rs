//! Replies as values, for the few places that must look inside them:
//! merging the replies of several nodes into one. The hot path never comes
//! here; it forwards raw bytes.

use bytes::{Bytes, BytesMut};
use redis_protocol::{resp2::types::BytesFrame as Frame2, resp3::types::BytesFrame as Frame3};

use super::{
    Protocol,
    reply::{self, Encoder},
};

/// A decoded reply. RESP2 has no maps, doubles or booleans: they arrive as
/// arrays, bulk strings and integers, and are written back the same way.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Simple(Bytes),
    Error(Bytes),
    Int(i64),
    Bulk(Bytes),
    Null,
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
    Double(f64),
    Bool(bool),
    /// RESP3 verbatim text (its format prefix dropped).
    Verbatim(Bytes),
}

impl Value {
    /// Decodes one complete reply in `protocol`.
    pub fn decode(raw: &Bytes, protocol: Protocol) -> Option<Self> {
        match protocol {
            Protocol::Resp2 => reply::frame2(raw).map(|f| Self::from2(&f)),
            Protocol::Resp3 => reply::frame3(raw).map(|f| Self::from3(&f)),
        }
    }

    fn from2(frame: &Frame2) -> Self {
        match frame {
            Frame2::SimpleString(s) => Self::Simple(s.clone()),
            Frame2::Error(e) => Self::Error(Bytes::copy_from_slice(e.as_bytes())),
            Frame2::Integer(n) => Self::Int(*n),
            Frame2::BulkString(b) => Self::Bulk(b.clone()),
            Frame2::Array(items) => Self::Array(items.iter().map(Self::from2).collect()),
            Frame2::Null => Self::Null,
        }
    }

    fn from3(frame: &Frame3) -> Self {
        match frame {
            Frame3::SimpleString { data, .. } => Self::Simple(data.clone()),
            Frame3::SimpleError { data, .. } => {
                Self::Error(Bytes::copy_from_slice(data.as_bytes()))
            }
            Frame3::BlobError { data, .. } => Self::Error(data.clone()),
            Frame3::Number { data, .. } => Self::Int(*data),
            Frame3::BlobString { data, .. } => Self::Bulk(data.clone()),
            Frame3::Null => Self::Null,
            Frame3::Array { data, .. } | Frame3::Push { data, .. } => {
                Self::Array(data.iter().map(Self::from3).collect())
            }
            Frame3::Set { data, .. } => Self::Array(data.iter().map(Self::from3).collect()),
            Frame3::Map { data, .. } => Self::Map(
                data.iter()
                    .map(|(k, v)| (Self::from3(k), Self::from3(v)))
                    .collect(),
            ),
            Frame3::Double { data, .. } => Self::Double(*data),
            Frame3::Boolean { data, .. } => Self::Bool(*data),
            Frame3::VerbatimString { data, .. } => Self::Verbatim(data.clone()),
            Frame3::BigNumber { data, .. } => Self::Bulk(data.clone()),
            Frame3::ChunkedString(data) => Self::Bulk(data.clone()),
            Frame3::Hello { .. } => Self::Null,
        }
    }

    /// Writes the value in `protocol`.
    pub fn encode(&self, protocol: Protocol) -> Bytes {
        let mut out = BytesMut::new();
        self.write(&mut Encoder {
            out: &mut out,
            protocol,
        });
        out.freeze()
    }

    pub fn write(&self, e: &mut Encoder<'_>) {
        match self {
            Self::Simple(s) => e.simple(&String::from_utf8_lossy(s)),
            Self::Error(m) => e.error(&String::from_utf8_lossy(m)),
            Self::Int(n) => e.integer(*n),
            Self::Bulk(b) => e.bulk(b),
            Self::Null => e.null(),
            Self::Array(items) => {
                e.array(items.len());
                for item in items {
                    item.write(e);
                }
            }
            Self::Map(pairs) => {
                e.map(pairs.len());
                for (k, v) in pairs {
                    k.write(e);
                    v.write(e);
                }
            }
            Self::Double(d) => match e.protocol {
                Protocol::Resp2 => e.bulk(format_double(*d).as_bytes()),
                Protocol::Resp3 => e.raw(format!(",{}\r\n", format_double(*d)).as_bytes()),
            },
            Self::Bool(b) => match e.protocol {
                Protocol::Resp2 => e.integer(i64::from(*b)),
                Protocol::Resp3 => e.raw(if *b { b"#t\r\n" } else { b"#f\r\n" }),
            },
            Self::Verbatim(text) => e.verbatim(&String::from_utf8_lossy(text)),
        }
    }

    /// The bytes of a string-like value.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Self::Simple(b) | Self::Bulk(b) | Self::Verbatim(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Self::Int(n) => Some(*n),
            Self::Bool(b) => Some(i64::from(*b)),
            Self::Bulk(b) | Self::Simple(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }

    /// The elements of an array (a map's keys and values alternate, as in
    /// RESP2).
    pub fn into_items(self) -> Option<Vec<Value>> {
        match self {
            Self::Array(items) => Some(items),
            Self::Map(pairs) => Some(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect()),
            _ => None,
        }
    }

    /// Key/value pairs of a map, or of a RESP2 flat array.
    pub fn into_pairs(self) -> Option<Vec<(Value, Value)>> {
        match self {
            Self::Map(pairs) => Some(pairs),
            Self::Array(items) if items.len() % 2 == 0 => {
                let mut it = items.into_iter();
                let mut pairs = Vec::new();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((k, v));
                }
                Some(pairs)
            }
            _ => None,
        }
    }
}

/// Doubles as Redis prints them (`%.17g`-like: shortest exact form).
fn format_double(d: f64) -> String {
    if d.is_infinite() {
        if d > 0.0 { "inf".into() } else { "-inf".into() }
    } else {
        let mut s = d.to_string();
        if s.ends_with(".0") {
            s.truncate(s.len() - 2);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_in_both_protocols() {
        for (raw, protocol) in [
            (&b"*3\r\n$1\r\na\r\n:5\r\n$-1\r\n"[..], Protocol::Resp2),
            (&b"%1\r\n+k\r\n,1.5\r\n"[..], Protocol::Resp3),
            (&b"*2\r\n#t\r\n_\r\n"[..], Protocol::Resp3),
        ] {
            let raw = Bytes::copy_from_slice(raw);
            let value = Value::decode(&raw, protocol).expect("decodes");
            assert_eq!(value.encode(protocol), raw);
        }
        let map = Value::Map(vec![(Value::Simple("k".into()), Value::Int(1))]);
        assert_eq!(&map.encode(Protocol::Resp2)[..], b"*2\r\n+k\r\n:1\r\n");
        assert_eq!(
            Value::Array(vec![Value::Bulk("a".into()), Value::Int(2)]).into_pairs(),
            Some(vec![(Value::Bulk("a".into()), Value::Int(2))])
        );
    }
}
