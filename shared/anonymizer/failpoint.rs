//! Fault injection for tests, read once at start from `ANONYMIZER_FAILPOINT`; unset in
//! production.

/// Fault injection for tests, from `ANONYMIZER_FAILPOINT` (unset in production):
/// - `abort_every:<n>` aborts every n-th transaction instead of committing it, exercising
///   abort-and-rewind against a real broker (an abortable error from the coordinator is hard to
///   provoke on demand);
/// - `send_error_at:<n>` makes the n-th `send()` of the process fail with an abortable error, in
///   the middle of a transaction that already holds records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failpoint {
    AbortEvery(u64),
    SendErrorAt(u64),
}

impl Failpoint {
    pub(super) fn from_env() -> Option<Failpoint> {
        let value = std::env::var("ANONYMIZER_FAILPOINT").ok()?;
        Some(Failpoint::parse(&value).unwrap_or_else(|| {
            panic!("unknown ANONYMIZER_FAILPOINT {value:?} (abort_every:<n> or send_error_at:<n>)")
        }))
    }

    fn parse(value: &str) -> Option<Failpoint> {
        let (kind, n) = value.split_once(':')?;
        let n = n.parse().ok().filter(|&n| n > 0)?;
        match kind {
            "abort_every" => Some(Failpoint::AbortEvery(n)),
            "send_error_at" => Some(Failpoint::SendErrorAt(n)),
            _ => None,
        }
    }
}

pub(super) struct AbortInjection {
    pub(super) every: u64,
    pub(super) due: u64,
}

impl AbortInjection {
    pub(super) fn fires(&mut self) -> bool {
        self.due += 1;
        self.due % self.every == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failpoints_parse() {
        assert_eq!(
            Failpoint::parse("abort_every:3"),
            Some(Failpoint::AbortEvery(3))
        );
        assert_eq!(
            Failpoint::parse("send_error_at:7"),
            Some(Failpoint::SendErrorAt(7))
        );
        for bad in ["abort_every:0", "send_error_at:x", "nope:1", "abort_every"] {
            assert_eq!(Failpoint::parse(bad), None, "{bad}");
        }
    }
}
