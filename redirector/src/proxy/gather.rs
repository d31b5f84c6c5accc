//! Commands whose parts go out in the session's own turn: a multi-key
//! command split per slot, a fan-out to every master (or node), and a
//! tracking client's command after CLIENT CACHING.
//!
//! Redis runs one client's commands one at a time. The parts join the
//! session's per-node jobs in request order, on the very connections its
//! single-slot commands take, so on every node they run between the
//! client's earlier and later commands, and a pipeline of them stays one
//! write per node. Their replies land in the session's inbox under
//! consecutive sequence numbers; once all are in, [`Gather::finish`]
//! merges them, or hands the parts that met a redirect or a failover to a
//! task (as a single-slot command's retry is).

use std::{net::SocketAddr, ops::Range, sync::Arc};

use bytes::Bytes;
use futures::future::BoxFuture;

use super::{
    Shared, UpstreamError,
    clients::ClientEntry,
    exec::{self, Routed, Verdict},
    merge::Merge,
};
use crate::resp::{
    Protocol,
    reply::{self, Reply},
    request::Request,
};

/// One command's parts, sent; waiting for their replies.
pub struct Gather {
    /// Sequence number of the first part's reply; the others follow it.
    pub first: u64,
    pub protocol: Protocol,
    pub work: Work,
}

/// What the parts are, and how their replies become the command's.
pub enum Work {
    /// One command per slot (see [`exec::split_parts`]), merged.
    Split {
        parts: Vec<Routed>,
        groups: Vec<(u16, Vec<Range<usize>>)>,
        how: Merge,
    },
    /// The client's command to every target (never redirected), merged.
    FanOut {
        req: Request,
        targets: Vec<SocketAddr>,
        how: Merge,
        readonly: bool,
        client: Arc<ClientEntry>,
    },
    /// CLIENT CACHING, then the command it is about, on one connection:
    /// the command's reply is the one kept.
    Caching { routed: Routed },
}

/// A gathered command's outcome.
pub enum Finished {
    Reply(Bytes),
    /// Some part needs more than its first attempt.
    Later(BoxFuture<'static, Bytes>),
}

impl Gather {
    /// How many replies the parts produce (consecutive sequence numbers).
    pub fn replies(&self) -> usize {
        match &self.work {
            Work::Split { parts, .. } => parts.len(),
            Work::FanOut { targets, .. } => targets.len(),
            Work::Caching { .. } => 2,
        }
    }

    /// The command's reply from its parts' first replies, in part order.
    pub fn finish(
        self,
        shared: &Arc<Shared>,
        results: Vec<Result<Reply, UpstreamError>>,
    ) -> Finished {
        let protocol = self.protocol;
        match self.work {
            Work::Split { parts, groups, how } => match settle(parts, results) {
                Ok(replies) => Finished::Reply(exec::merge_split(&groups, how, &replies, protocol)),
                Err(unsettled) => {
                    let shared = Arc::clone(shared);
                    Finished::Later(Box::pin(async move {
                        let mut replies = Vec::with_capacity(unsettled.len());
                        for (routed, verdict) in unsettled {
                            replies.push(match verdict {
                                Verdict::Done(reply) => reply,
                                verdict => {
                                    exec::complete(Arc::clone(&shared), routed, verdict).await
                                }
                            });
                        }
                        exec::merge_split(&groups, how, &replies, protocol)
                    }))
                }
            },
            Work::FanOut {
                req,
                targets,
                how,
                readonly,
                client,
            } => {
                let replies = fan_out_replies(results, readonly);
                Finished::Reply(exec::fan_out_merged(
                    shared, &req, &targets, how, &replies, protocol, &client,
                ))
            }
            Work::Caching { routed } => {
                // CLIENT CACHING's own reply is not the client's.
                let Some(result) = results.into_iter().nth(1) else {
                    return Finished::Reply(reply::error("ERR redirector: no reply"));
                };
                match exec::judge_one(result, routed.target.readonly) {
                    Verdict::Done(reply) => Finished::Reply(reply.raw),
                    verdict => {
                        let shared = Arc::clone(shared);
                        Finished::Later(Box::pin(async move {
                            exec::complete(shared, routed, verdict).await.raw
                        }))
                    }
                }
            }
        }
    }
}

/// The parts' replies when every first attempt is final; otherwise every
/// part with its verdict, for the ones to follow up.
fn settle(
    parts: Vec<Routed>,
    results: Vec<Result<Reply, UpstreamError>>,
) -> Result<Vec<Reply>, Vec<(Routed, Verdict)>> {
    let verdicts: Vec<(Routed, Verdict)> = parts
        .into_iter()
        .zip(results)
        .map(|(routed, result)| {
            let verdict = exec::judge_one(result, routed.target.readonly);
            (routed, verdict)
        })
        .collect();
    if !verdicts.iter().all(|(_, v)| v.is_done()) {
        return Err(verdicts);
    }
    Ok(verdicts
        .into_iter()
        .filter_map(|(_, verdict)| match verdict {
            Verdict::Done(reply) => Some(reply),
            _ => None,
        })
        .collect())
}

/// A fan-out's replies, one per target: as they came, or the error the
/// client gets for a target that failed (fan-outs are not retried).
fn fan_out_replies(results: Vec<Result<Reply, UpstreamError>>, readonly: bool) -> Vec<Reply> {
    results
        .into_iter()
        .map(|result| match exec::judge_one(result, readonly) {
            Verdict::Done(reply) | Verdict::Retry { reply } | Verdict::Redirect { reply, .. } => {
                reply
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(raw: &'static [u8]) -> Result<Reply, UpstreamError> {
        Ok(Reply::local(Bytes::from_static(raw)))
    }

    fn part(slot: u16) -> Routed {
        Routed {
            payload: Bytes::from_static(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n"),
            target: exec::Target {
                slot: Some(slot),
                readonly: true,
            },
            protocol: Protocol::Resp2,
            via: None,
        }
    }

    fn mget_groups() -> Vec<(u16, Vec<Range<usize>>)> {
        // MGET a b c: `a` and `c` in slot 1, `b` in slot 2.
        vec![(1, vec![1..2, 3..4]), (2, std::iter::once(2..3).collect())]
    }

    #[test]
    fn split_parts_answered_at_once_merge_in_key_order() {
        let replies = settle(
            vec![part(1), part(2)],
            vec![
                reply(b"*2\r\n$1\r\nA\r\n$1\r\nC\r\n"),
                reply(b"*1\r\n$1\r\nB\r\n"),
            ],
        )
        .unwrap_or_else(|_| panic!("every part is final"));
        assert_eq!(
            &exec::merge_split(&mget_groups(), Merge::Values, &replies, Protocol::Resp2)[..],
            b"*3\r\n$1\r\nA\r\n$1\r\nB\r\n$1\r\nC\r\n"
        );
    }

    #[test]
    fn a_redirected_or_failed_part_is_followed_up_and_the_others_kept() {
        let addr: SocketAddr = "127.0.0.1:7000".parse().expect("address");
        let unsettled = settle(
            vec![part(1), part(2), part(3)],
            vec![
                reply(b"*1\r\n$1\r\nA\r\n"),
                reply(b"-MOVED 2 127.0.0.1:7001\r\n"),
                Err(UpstreamError::NotSent(addr, "closed".into())),
            ],
        )
        .expect_err("two parts need more");
        let kinds: Vec<&str> = unsettled
            .iter()
            .map(|(_, v)| match v {
                Verdict::Done(_) => "done",
                Verdict::Redirect { .. } => "redirect",
                Verdict::Retry { .. } => "retry",
            })
            .collect();
        assert_eq!(kinds, ["done", "redirect", "retry"]);
        assert_eq!(
            unsettled[1].0.target.slot,
            Some(2),
            "parts keep their place"
        );
    }

    #[test]
    fn a_fan_out_target_that_failed_answers_with_its_error_in_its_place() {
        let addr: SocketAddr = "127.0.0.1:7000".parse().expect("address");
        let replies = fan_out_replies(
            vec![
                reply(b":3\r\n"),
                Err(UpstreamError::Lost(addr, "reset".into())),
            ],
            false,
        );
        assert_eq!(&replies[0].raw[..], b":3\r\n");
        assert!(replies[1].is_error());
        assert!(
            String::from_utf8_lossy(&replies[1].raw).contains("may or may not have been applied"),
            "a write that may have run is not retried"
        );
    }

    #[test]
    fn a_gather_counts_one_reply_per_part() {
        let caching = Gather {
            first: 5,
            protocol: Protocol::Resp2,
            work: Work::Caching { routed: part(1) },
        };
        assert_eq!(caching.replies(), 2);
        let req = Request::from_args(vec![Bytes::from_static(b"MGET"); 4]);
        let split = Gather {
            first: 0,
            protocol: Protocol::Resp2,
            work: Work::Split {
                parts: exec::split_parts(&req, &mget_groups(), Protocol::Resp2, true, None),
                groups: mget_groups(),
                how: Merge::Values,
            },
        };
        assert_eq!(split.replies(), 2);
    }
}
