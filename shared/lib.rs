//! edgelog: an exactly-once pipeline for CDN HTTP access logs.
//!
//! ```text
//!  http_log (Cap'n Proto) ──► anonymizer ──► http_log_anon (MessagePack) ──► loader ──► nginx ──► ClickHouse
//!                               │  Kafka transaction:                      │  one insert per proxy slot,
//!                               │  output + input offsets                  │  dedup token from offset ranges
//!                               └──► http_log_dlq (rejected input)       └──► http_log_anon_dlq (quarantined)
//! ```
//!
//! This crate is the library; the binaries in `stages/` are thin wrappers that parse arguments,
//! load [`config::Settings`], start telemetry and call one `run` function with a shutdown future.
//!
//! Layers, imports pointing down (docs/ARCHITECTURE.md draws them, with where each decision lives
//! and the path of one record):
//! 1. protocol and pure decisions: `record`, `anon_record`, `validate`, `anonymize`,
//!    `url_query`, `dead_letter`, `batch`, `body`, `clock`, `cluster_schema`; they import no
//!    stage;
//! 2. settings: `config`;
//! 3. adapters: `kafka`, `topic_id`, `clickhouse`, `telemetry`, `health`, `log_gate`,
//!    `shutdown`, `cli`, `txn`;
//! 4. stages and tools: `anonymizer`, `loader`, `producer` (with `synth`), `setup`, `staging`,
//!    `replay`, `backfill`, `status`, `verify`, `capacity`.
//!
//! Layout, one module per concern:
//! - [`cli`]: flags shared by every binary and the start-up sequence (settings, then logging).
//! - [`config`]: figment settings (defaults < TOML file < `EDGELOG_` environment), validation.
//! - [`telemetry`]: tracing subscriber (human or JSON); the HTTP listener for `/metrics` and health.
//! - [`health`]: liveness, readiness and status of a stage (pure decisions, shared state).
//! - [`log_gate`]: log a repeating condition (a dead broker) at a bounded rate, with counts.
//! - [`shutdown`]: the SIGINT/SIGTERM future every `run` function takes.
//! - [`clock`]: wall-clock milliseconds (pure code takes "now" as a parameter instead).
//! - [`dead_letter`]: the dead-letter protocol of both stages: headers, reasons, bounded envelope.
//! - [`batch`]: the loader's batch identity (offset ranges, topic id), its commit-metadata text
//!   and dedup token: a protocol shared by the loader, `status`, `verify` and `replay`.
//! - [`body`]: the insert body (ClickHouse Native, rows in a fixed order, compressed), a pure
//!   function of the records; used by the loader and `replay`.
//! - [`cluster_schema`]: cluster mode's DDL: each migration statement as a shard-local table and
//!   a `Distributed` table (replicated `ON CLUSTER` form, and the per-shard form `setup` applies).
//! - [`record`]: the log record, its Cap'n Proto wire form (input topic).
//! - [`validate`]: the validity policy of an input record's fields (pure; now is a parameter).
//! - [`anonymize`]: the IP anonymization, a pure function.
//! - [`url_query`]: what stage one keeps of a URL's query string and fragment (`anonymizer.url_query`).
//! - [`anon_record`]: the MessagePack record of the anonymized topic and the stage-one transform.
//! - [`txn`]: classification of Kafka transactional errors and the retry loop around them.
//! - [`anonymizer`]: stage one, the transactional consume-transform-produce loop (its loop, the
//!   transactional producer, one record's output, the size limit: one file each).
//! - [`loader`]: stage two: batches by offset ranges, Native+xz bodies, one insert per proxy slot;
//!   a `Loader` value runs named phases (fill, plan, record, encode, send, confirm), one file per
//!   concern below it.
//! - [`synth`]: the seeded synthetic traffic model used by the producer and the benchmarks.
//! - [`kafka`]: librdkafka client configuration built from settings; [`kafka::KafkaWatch`], which
//!   reports a client's errors, and [`kafka::permanent_failure`], which tells a refusal (credentials,
//!   ACLs, certificate: the stage stops) from an unreachable cluster (the stage waits).
//! - [`producer`]: the synthetic producer's run loop.
//! - [`topic_id`]: the id Kafka gives a topic at creation (binds dedup tokens to the topic's life).
//! - [`clickhouse`]: the one HTTP(S) client for ClickHouse (the loader's inserts, the tools'
//!   queries): credentials, timeouts, TLS (rustls with ring, `clickhouse.ca_file`).
//! - [`setup`]: idempotent creation of topics and application of `sql/` migrations.
//! - [`staging`]: rebuild tables per partition in staging copies and swap them in (replay, backfill).
//! - [`replay`]: `edgelog replay`: reload whole days from the anonymized topic, swapped in per partition.
//! - [`backfill`]: `edgelog backfill`: rebuild rollups from the raw table (a view added later starts empty).
//! - [`status`]: `edgelog status`: positions, lag, pending batch, each stage's `/status`.
//! - [`verify`]: the exactly-once audit: input offsets versus ClickHouse rows, totals recount.
//! - [`capacity`]: expected disk use per table for a rate and a retention (`edgelog disk`).

pub mod anon_record;
pub mod anonymize;
pub mod anonymizer;
pub mod backfill;
pub mod batch;
pub mod body;
pub mod capacity;
pub mod cli;
pub mod clickhouse;
pub mod clock;
pub mod cluster_schema;
pub mod config;
pub mod dead_letter;
pub mod health;
pub mod kafka;
pub mod loader;
pub mod log_gate;
pub mod producer;
pub mod record;
pub mod replay;
pub mod setup;
pub mod shutdown;
pub mod staging;
pub mod status;
pub mod synth;
pub mod telemetry;
pub mod topic_id;
pub mod txn;
pub mod url_query;
pub mod validate;
pub mod verify;

/// Code generated by capnpc from `schema/http_log.capnp` (see `build.rs`).
#[allow(clippy::all, clippy::pedantic, dead_code, unused_parens)]
pub mod http_log_capnp {
    include!(concat!(env!("OUT_DIR"), "/http_log_capnp.rs"));
}
