//! The id Kafka gives a topic when it is created (KIP-516, Kafka 2.8+): a topic deleted and
//! created again under the same name gets a new id, and its offsets start again at 0. The loader
//! binds its dedup tokens to it, so a recreated topic's offset ranges can never repeat a token
//! still inside ClickHouse's dedup window.
//!
//! rust-rdkafka does not wrap librdkafka's `DescribeTopics`, so this calls it directly: one
//! request on a temporary queue, everything it allocates freed before returning.

use std::ffi::{CStr, CString};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::client::{Client, ClientContext};

/// What an unknown or pre-2.8 topic id reads as (all zero bits, base64).
pub const ZERO_TOPIC_ID: &str = "AAAAAAAAAAAAAAAAAAAAAA";

/// Why no id could be read.
#[derive(Debug, thiserror::Error)]
pub enum TopicIdError {
    /// No answer from the cluster (timed out, no broker reachable): worth retrying.
    #[error("describing topic {topic}: no answer from the cluster: {detail}")]
    Unreachable { topic: String, detail: String },
    #[error("topic {0} does not exist (run `edgelog setup`)")]
    NoSuchTopic(String),
    /// The cluster answered with an error code (e.g. an authorization failure).
    #[error("describing topic {topic}: {detail}")]
    Refused {
        topic: String,
        code: rdkafka::types::RDKafkaErrorCode,
        detail: String,
    },
    #[error("describing topic {topic}: {detail}")]
    Other { topic: String, detail: String },
}

/// The base64 topic id of `topic` (22 characters), as Kafka's own tools print it.
pub fn topic_id<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<String, TopicIdError> {
    use rd::rd_kafka_resp_err_t::*;
    let other = |detail: String| TopicIdError::Other {
        topic: topic.to_string(),
        detail,
    };
    let name = CString::new(topic).map_err(|_| other("a NUL byte in the name".into()))?;
    let names = [name.as_ptr()];
    // SAFETY: every pointer passed to librdkafka is valid for the call; every object created here
    // is destroyed on every path below (the guards run on return); strings read from the result
    // are copied before the event that owns them is destroyed.
    unsafe {
        let rk = client.native_ptr();
        let queue = Guard(rd::rd_kafka_queue_new(rk), rd::rd_kafka_queue_destroy);
        let collection = Guard(
            rd::rd_kafka_TopicCollection_of_topic_names(names.as_ptr() as *mut _, 1),
            rd::rd_kafka_TopicCollection_destroy,
        );
        let options = Guard(
            rd::rd_kafka_AdminOptions_new(
                rk,
                rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
            ),
            rd::rd_kafka_AdminOptions_destroy,
        );
        let mut errstr = [0 as std::os::raw::c_char; 512];
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options.0,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        rd::rd_kafka_DescribeTopics(rk, collection.0, options.0, queue.0);
        let event = Guard(
            rd::rd_kafka_queue_poll(queue.0, timeout_ms.saturating_add(1000)),
            rd::rd_kafka_event_destroy,
        );
        if event.0.is_null() {
            return Err(TopicIdError::Unreachable {
                topic: topic.to_string(),
                detail: format!("no answer within {timeout:?}"),
            });
        }
        let err = rd::rd_kafka_event_error(event.0);
        if err != RD_KAFKA_RESP_ERR_NO_ERROR {
            let detail = text(rd::rd_kafka_event_error_string(event.0));
            return Err(match err {
                RD_KAFKA_RESP_ERR__TIMED_OUT
                | RD_KAFKA_RESP_ERR__TRANSPORT
                | RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN
                | RD_KAFKA_RESP_ERR__RESOLVE => TopicIdError::Unreachable {
                    topic: topic.to_string(),
                    detail,
                },
                code => TopicIdError::Refused {
                    topic: topic.to_string(),
                    code: code.into(),
                    detail,
                },
            });
        }
        let result = rd::rd_kafka_event_DescribeTopics_result(event.0);
        if result.is_null() {
            return Err(other("unexpected answer".into()));
        }
        let mut count = 0usize;
        let topics = rd::rd_kafka_DescribeTopics_result_topics(result, &mut count);
        if topics.is_null() || count != 1 {
            return Err(other(format!("{count} topics in the answer")));
        }
        let description = *topics;
        let error = rd::rd_kafka_TopicDescription_error(description);
        if !error.is_null() {
            match rd::rd_kafka_error_code(error) {
                RD_KAFKA_RESP_ERR_NO_ERROR => {}
                RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART => {
                    return Err(TopicIdError::NoSuchTopic(topic.to_string()))
                }
                code => {
                    return Err(TopicIdError::Refused {
                        topic: topic.to_string(),
                        code: code.into(),
                        detail: text(rd::rd_kafka_error_string(error)),
                    })
                }
            }
        }
        let id = rd::rd_kafka_TopicDescription_topic_id(description);
        if id.is_null() {
            return Err(other("no topic id in the answer".into()));
        }
        Ok(text(rd::rd_kafka_Uuid_base64str(id)))
    }
}

/// Destroys a librdkafka object when dropped (null is skipped).
struct Guard<T>(*mut T, unsafe extern "C" fn(*mut T));

impl<T> Drop for Guard<T> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by the matching librdkafka constructor, destroyed once.
            unsafe { (self.1)(self.0) }
        }
    }
}

/// Copies a C string librdkafka owns (empty for null).
///
/// # Safety
/// `p` is null or a valid NUL-terminated string.
unsafe fn text(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}
