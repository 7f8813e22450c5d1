//! `GET /metrics`: the server's counters in Prometheus' text format (`prometheus-client`),
//! named as vLLM names its own where there is one (with `petal_` in place of `vllm:`), so
//! that dashboards made for vLLM need only the prefix changed.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Code {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Finish {
    pub finished_reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Adapter {
    pub adapter: String,
}

/// Every metric, shared by the HTTP side and the engine.
pub(crate) struct Metrics {
    registry: Registry,
    /// completion requests answered, by HTTP status
    pub requests: Family<Code, Counter>,
    /// completions finished, by finish reason
    pub success: Family<Finish, Counter>,
    /// completions per adapter (`__base__`: the base model), as vLLM's `lora_requests_info`
    pub lora_requests: Family<Adapter, Counter>,
    pub cancelled: Counter,
    pub prompt_tokens: Counter,
    /// prompt tokens found in the prefix cache (read from a finished sequence's cache)
    pub prefix_cache_hits: Counter,
    pub generation_tokens: Counter,
    pub running: Gauge,
    pub waiting: Gauge,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub e2e_latency: Histogram,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let secs = |start: f64, n: u16| Histogram::new(exponential_buckets(start, 2.0, n));
        let m = Metrics {
            requests: Family::default(),
            success: Family::default(),
            lora_requests: Family::default(),
            cancelled: Counter::default(),
            prompt_tokens: Counter::default(),
            prefix_cache_hits: Counter::default(),
            generation_tokens: Counter::default(),
            running: Gauge::default(),
            waiting: Gauge::default(),
            time_to_first_token: secs(0.005, 16),
            time_per_output_token: secs(0.001, 16),
            e2e_latency: secs(0.01, 18),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "petal_requests",
            "Completion requests answered, by HTTP status",
            m.requests.clone(),
        );
        r.register(
            "petal_request_success",
            "Completions finished, by finish reason",
            m.success.clone(),
        );
        r.register(
            "petal_lora_requests",
            "Completions per adapter (__base__: the base model)",
            m.lora_requests.clone(),
        );
        r.register(
            "petal_requests_cancelled",
            "Completions dropped because their client left",
            m.cancelled.clone(),
        );
        r.register(
            "petal_prompt_tokens",
            "Prompt tokens prefilled",
            m.prompt_tokens.clone(),
        );
        r.register(
            "petal_prefix_cache_hits",
            "Prompt tokens taken from the prefix cache (counted as requests are admitted)",
            m.prefix_cache_hits.clone(),
        );
        r.register(
            "petal_generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        r.register(
            "petal_num_requests_running",
            "Completions in the batch",
            m.running.clone(),
        );
        r.register(
            "petal_num_requests_waiting",
            "Completions read or queued, not yet in the batch",
            m.waiting.clone(),
        );
        r.register(
            "petal_time_to_first_token_seconds",
            "From a completion's arrival at the engine to its first token",
            m.time_to_first_token.clone(),
        );
        r.register(
            "petal_time_per_output_token_seconds",
            "Mean time between a completion's tokens after the first",
            m.time_per_output_token.clone(),
        );
        r.register(
            "petal_e2e_request_latency_seconds",
            "From a completion's arrival at the engine to its last token",
            m.e2e_latency.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // writing into a String cannot fail
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
