//! The job file as written: TOML deserialized into structs that refuse unknown fields, before
//! any value is checked. [`super::validate`] turns them into a [`super::Job`].

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJob {
    pub(super) name: String,
    pub(super) broker: RawBroker,
    #[serde(default)]
    pub(super) state: RawState,
    pub(super) source: RawSource,
    #[serde(default)]
    pub(super) chunking: RawChunking,
    #[serde(default)]
    pub(super) throttle: RawThrottle,
    pub(super) processor: RawProcessor,
    #[serde(default)]
    pub(super) retry: RawRetry,
    #[serde(default)]
    pub(super) failures: RawFailures,
    #[serde(default)]
    pub(super) notify: RawNotify,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) dispatcher: Option<String>,
    pub(super) consumer: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNotify {
    pub(super) command: Option<Vec<String>>,
    pub(super) webhook: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBroker {
    pub(super) url: String,
    pub(super) heartbeat: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) cert_file: Option<String>,
    pub(super) key_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    pub(super) url: Option<String>,
    pub(super) schema: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub(super) kind: String,
    pub(super) path: Option<String>,
    pub(super) format: Option<String>,
    pub(super) url: Option<String>,
    pub(super) query: Option<String>,
    pub(super) key: Option<RawKey>,
}

/// `source.key`: one column, or several.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawKey {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChunking {
    pub(super) items: Option<u64>,
    pub(super) max_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawThrottle {
    pub(super) window: Option<u64>,
    pub(super) rate: Option<f64>,
    pub(super) ramp_up: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProcessor {
    pub(super) kind: String,
    pub(super) command: Option<Vec<String>>,
    pub(super) dir: Option<String>,
    pub(super) options: Option<toml::Table>,
    pub(super) url: Option<String>,
    pub(super) statement: Option<String>,
    pub(super) params: Option<Vec<String>>,
    pub(super) env: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub(super) max_attempts: Option<u32>,
    pub(super) backoff: Option<String>,
    pub(super) chunk_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFailures {
    pub(super) skip_limit: Option<u64>,
}
