//! The command planner: any argv, in any session state, gets a plan or a
//! Redis error reply; never a panic. Every slot a plan names is a real
//! slot, every split range is inside the request, and every refusal is
//! one well-formed error frame.
#![no_main]

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use redirector::{
    cluster::commands::CommandTable,
    proxy::plan::{self, Admin, Plan, SessionState, Txn},
    resp::{
        Protocol,
        reply::{self, ReplyKind},
        request::{self, Limits, Parsed, Request},
    },
};

/// Redis 7.0's `COMMAND` reply, as the proxy reads it from a node.
const COMMAND_7_0: &[u8] = include_bytes!("../../redirector/src/cluster/testdata/command-7.0.resp");
const SLOTS: u16 = 16384;

static TABLE: LazyLock<CommandTable> = LazyLock::new(|| {
    let raw = Bytes::from_static(COMMAND_7_0);
    let frame = reply::frame2(&raw).expect("the COMMAND reply decodes");
    CommandTable::from_command_reply(&frame).expect("the COMMAND reply parses")
});

fuzz_target!(|data: &[u8]| {
    // The first byte is the session's state; the rest, its requests (RESP
    // or inline, as a client sends them).
    let Some((&flags, requests)) = data.split_first() else {
        return;
    };
    let state = SessionState {
        protocol: if flags & 1 == 0 {
            Protocol::Resp2
        } else {
            Protocol::Resp3
        },
        authed: flags & 2 == 0,
        in_multi: flags & 4 != 0,
        subscribed_resp2: flags & 8 != 0,
        one_shard: flags & 16 != 0,
        admin: if flags & 32 == 0 {
            Admin::Allowed
        } else {
            Admin::Refused {
                backend: "shop/cart",
            }
        },
    };
    let mut buf = BytesMut::from(requests);
    while let Ok(Parsed::Request(req)) = request::parse(&mut buf, &Limits::default()) {
        check(&req, &state);
    }
});

fn check(req: &Request, state: &SessionState) {
    let info = TABLE.lookup(req.args());
    let planned = plan::plan(&TABLE, req, state);
    assert_eq!(planned, plan::plan_known(&TABLE, info, req, state));
    let slot_ok = |slot: u16| slot < SLOTS;
    match &planned {
        Plan::Refuse(error) | Plan::Queue(Err(error)) => check_error(error),
        Plan::Queue(Ok(slot)) | Plan::Route { slot, .. } | Plan::Blocking { slot } => {
            assert!(slot.is_none_or(slot_ok), "{planned:?} for {req:?}");
        }
        Plan::Publish { slot } | Plan::Txn(Txn::Watch { slot }) => {
            assert!(slot_ok(*slot), "{planned:?} for {req:?}");
        }
        Plan::Split { groups, .. } => {
            assert!(!groups.is_empty());
            for (slot, ranges) in groups {
                assert!(slot_ok(*slot), "{planned:?} for {req:?}");
                for range in ranges {
                    assert!(range.start >= 1 && range.start < range.end);
                    assert!(range.end <= req.argc(), "{planned:?} for {req:?}");
                }
            }
        }
        _ => {}
    }
    // The other decisions the session asks of a request.
    let _ = plan::may_block(req);
    let _ = plan::is_pubsub(&req.name_lower());
    if let Some(info) = info {
        if let Err(error) = plan::keys_slot(req, info) {
            check_error(&error);
        }
        let _ = plan::may_replicate(info, req);
        let _ = plan::monitored(info);
        let _ = plan::changes_credentials(info);
    } else {
        check_error(&plan::unknown_command(req));
    }
    if let Some(body) = req.args().get(1) {
        let _ = plan::script_declares_no_writes(body);
    }
}

/// One error frame, whole, in either protocol.
fn check_error(error: &Bytes) {
    for protocol in [Protocol::Resp2, Protocol::Resp3] {
        let mut buf = BytesMut::from(&error[..]);
        let frame = reply::decode(&mut buf, protocol)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("{error:?} is not a frame"));
        assert_eq!(frame.kind, ReplyKind::Error, "{error:?} is not an error");
        assert!(buf.is_empty(), "{error:?} is more than one frame");
    }
}
