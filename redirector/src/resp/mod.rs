//! RESP on both sides of the proxy: framing client requests (guarded against
//! hostile input before redis-protocol decodes them), decoding upstream
//! replies, and encoding the replies the proxy writes itself.

pub mod reply;
pub mod request;
pub mod value;

/// The protocol a connection speaks: RESP2 until `HELLO 3`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    #[default]
    Resp2,
    Resp3,
}
