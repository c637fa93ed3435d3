//! What a ClickHouse error means for the batch that got it: try the same batch again later, stop
//! the loader, or accept that this batch will never pass as it is and split it.
//!
//! A pure function of the exception code (`X-ClickHouse-Exception-Code`) and, where one code has
//! two causes, of the message text. The table is in docs/FORMATS.md; keep the two in step.

/// The loader's next step after a ClickHouse error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The server or its surroundings were not ready: the same batch (same bytes, same token)
    /// can pass in a later slot.
    Retriable,
    /// Nothing the loader sends can pass (schema, permissions, settings, an encoder bug): stop and
    /// alert rather than quarantine every record one by one.
    Permanent,
    /// The server refused this batch because of what is in it: some smaller batch can pass, so
    /// split it (down to one record, which is then quarantined).
    BatchCannotPass,
}

/// Codes a later retry of the very same request can pass after.
const RETRIABLE: &[u32] = &[
    3,   // UNEXPECTED_END_OF_FILE (body cut by a dying connection)
    32,  // ATTEMPT_TO_READ_AFTER_EOF (a shard's connection closed mid-insert: cluster mode)
    33,  // CANNOT_READ_ALL_DATA (same, seen from the Native reader)
    159, // TIMEOUT_EXCEEDED
    164, // READONLY (e.g. during a restart)
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    236, // ABORTED
    241, // MEMORY_LIMIT_EXCEEDED (server-wide memory pressure; a batch is at most ~10 MB raw)
    242, // TABLE_IS_READ_ONLY
    279, // ALL_CONNECTION_TRIES_FAILED (a shard unreachable: cluster mode)
    319, // UNKNOWN_STATUS_OF_INSERT
    335, // BARRIER_TIMEOUT
    394, // QUERY_WAS_CANCELLED
    425, // SYSTEM_ERROR
    439, // CANNOT_SCHEDULE_TASK
    999, // KEEPER_EXCEPTION
];

/// Codes that depend on the rows sent: a value the table refuses. The body is ClickHouse's own
/// Native format with fixed column types, so parse errors here come from a value, not the layout.
const DATA_DEPENDENT: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    469, // VIOLATED_CONSTRAINT
];

/// Code 252 is shared by TOO_MANY_PARTS (merges behind: wait) and TOO_MANY_PARTITIONS (one insert
/// block spans more partitions than `max_partitions_per_insert_block`: this batch never passes,
/// a smaller one does).
const TOO_MANY_PARTS_OR_PARTITIONS: u32 = 252;

/// Classifies a ClickHouse exception. Unknown codes are permanent: an unexpected failure stops
/// the loader with the error in its log, where an operator sees it, rather than being retried or
/// split without end.
pub fn classify_clickhouse(code: u32, message: &str) -> ErrorClass {
    if code == TOO_MANY_PARTS_OR_PARTITIONS {
        return if too_many_partitions(message) {
            ErrorClass::BatchCannotPass
        } else {
            ErrorClass::Retriable
        };
    }
    if RETRIABLE.contains(&code) {
        ErrorClass::Retriable
    } else if DATA_DEPENDENT.contains(&code) {
        ErrorClass::BatchCannotPass
    } else {
        ErrorClass::Permanent
    }
}

/// The TOO_MANY_PARTITIONS text ("Too many partitions for single INSERT block (more than 100)"),
/// stable since at least 19.x; TOO_MANY_PARTS says "Too many parts (N)".
fn too_many_partitions(message: &str) -> bool {
    message
        .to_ascii_lowercase()
        .contains("too many partitions for single insert block")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ErrorClass::*;

    #[test]
    fn code_252_is_told_apart_by_its_message() {
        let parts = "Code: 252. DB::Exception: Too many parts (300 with average size of 1.00 \
                     MiB) in table 'db.http_log'. Merges are processing significantly slower \
                     than inserts. (TOO_MANY_PARTS)";
        let partitions = "Code: 252. DB::Exception: Too many partitions for single INSERT block \
                          (more than 100). The limit is controlled by \
                          'max_partitions_per_insert_block' setting. (TOO_MANY_PARTS)";
        assert_eq!(classify_clickhouse(252, parts), Retriable);
        assert_eq!(classify_clickhouse(252, partitions), BatchCannotPass);
        assert_eq!(classify_clickhouse(252, ""), Retriable);
    }

    #[test]
    fn table_by_code() {
        for code in [
            3, 32, 159, 164, 202, 209, 210, 241, 242, 279, 319, 394, 425, 999,
        ] {
            assert_eq!(classify_clickhouse(code, "x"), Retriable, "{code}");
        }
        for code in [6, 27, 41, 69, 70, 72, 117, 131, 321, 469] {
            assert_eq!(classify_clickhouse(code, "x"), BatchCannotPass, "{code}");
        }
        // Schema, permissions, unknown setting or database, wrong column type, auth, unknown.
        for code in [16, 53, 60, 81, 115, 164_000, 192, 497, 516, 0] {
            assert_eq!(classify_clickhouse(code, "x"), Permanent, "{code}");
        }
    }

    #[test]
    fn the_lists_do_not_overlap() {
        for code in RETRIABLE {
            assert!(!DATA_DEPENDENT.contains(code), "{code}");
        }
        assert!(!RETRIABLE.contains(&TOO_MANY_PARTS_OR_PARTITIONS));
        assert!(!DATA_DEPENDENT.contains(&TOO_MANY_PARTS_OR_PARTITIONS));
    }

    proptest! {
        /// Only 252 looks at the message: any other code's class is the same whatever the text.
        #[test]
        fn only_252_depends_on_the_message(code in 0u32..1200, a in ".{0,80}", b in ".{0,80}") {
            prop_assume!(code != TOO_MANY_PARTS_OR_PARTITIONS);
            prop_assert_eq!(classify_clickhouse(code, &a), classify_clickhouse(code, &b));
        }
    }
}
