//! What the coordinator and its worker processes say to each other.
//!
//! The coordinator starts each worker as `shardcast-loadtest worker` and writes one [`Job`]
//! as a JSON line on its stdin; later lines on stdin are commands ([`START`] with a time,
//! [`STOP`]). The worker writes JSON [`Line`]s on its stdout: [`Progress`] now and then,
//! [`Line::Opened`] once its connections are open, and one [`Line::Done`] at the end.
//! Histograms travel as base64 of hdrhistogram's V2 serialization, so the coordinator can
//! merge them exactly.

use std::net::IpAddr;

use anyhow::{Context, Result};
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::churn::ChurnPlan;
use crate::client::Population;
use crate::traffic::ClientSends;

/// Command: start sending at the [`crate::traffic::mono_us`] time that follows.
pub const START: &str = "start";

/// Command: stop, close every connection and report.
pub const STOP: &str = "stop";

/// One worker's share of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    /// This worker's number.
    pub worker: usize,
    /// Worker processes in the run; this one opens connections `worker`, `worker + workers`,
    /// ... of the population.
    pub workers: usize,
    /// The nodes' WebSocket URLs.
    pub urls: Vec<String>,
    /// Loopback source addresses.
    pub sources: Vec<IpAddr>,
    /// Threads opening and then reading the connections.
    pub threads: usize,
    /// Who the connections are.
    pub population: Population,
    /// Handshakes per second for this worker (0: as fast as it goes).
    pub connect_rate: f64,
    /// Topic publications the subscribers should get.
    pub pubs: usize,
    /// Direct messages in the run (received by this worker's users when addressed to them).
    pub direct: u64,
    /// Direct messages sent by clients (`send` frames), if they are.
    pub client_sends: Option<ClientSends>,
    /// Connections opened and closed while traffic flows, if any.
    pub churn: Option<ChurnPlan>,
    /// Seconds until the worker gives up.
    pub timeout_secs: f64,
    /// Up messages sent by clients (the `up` scenario), if any.
    #[serde(default)]
    pub up: Option<crate::up::UpSends>,
}

/// Counts a worker reports while it runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Connections open.
    pub opened: usize,
    /// Topic publications every subscriber of this worker has (a prefix: 0..this).
    pub fanout_complete: usize,
    /// Topic deliveries.
    pub fanout_delivered: u64,
    /// Direct messages delivered (first copies).
    pub direct_delivered: u64,
    /// Direct messages this worker's clients sent.
    pub sent: u64,
    /// Whether this worker's clients have sent all their share.
    pub sends_done: bool,
    /// Churn connections opened.
    pub churned: u64,
    /// Client sends answered so far (`ack` or `err`).
    #[serde(default)]
    pub answered: u64,
}

/// A line from a worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    /// Counts so far.
    Progress(Progress),
    /// Every connection of the worker is open (and subscribed).
    Opened {
        /// [`crate::traffic::mono_us`] when it began and finished opening.
        began_us: u64,
        /// See `began_us`.
        ended_us: u64,
        /// Handshake times, microseconds ([`encode`]).
        handshake_us: String,
    },
    /// The worker's final report.
    Done(Box<WorkerReport>),
}

/// A worker's final report.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Counts at the end.
    pub progress: Progress,
    /// Connections the server closed or that failed.
    pub lost: usize,
    /// Why, for the first few.
    pub lost_reasons: Vec<String>,
    /// Server pings read (and answered).
    pub pings: u64,
    /// Sends that could not be made (connection gone).
    pub send_failures: u64,
    /// `ack`s to client sends.
    pub acked: u64,
    /// `err`s to client sends.
    pub refused: u64,
    /// Text frames that were not expected.
    pub unexpected: u64,
    /// The first few refusals and unexpected frames.
    pub oddities: Vec<String>,
    /// Direct messages delivered more than once (extra copies).
    pub direct_duplicates: u64,
    /// Latency of first direct deliveries, microseconds ([`encode`]).
    pub direct_us: String,
    /// Per publication: arrivals at this worker.
    pub fanout_arrivals: Vec<u32>,
    /// Per publication: latency of the latest arrival here, microseconds.
    pub fanout_last_us: Vec<u64>,
    /// Topic deliveries out of order or repeated.
    pub fanout_anomalies: u64,
    /// Latency of every topic delivery, microseconds ([`encode`]).
    pub fanout_us: String,
    /// Churn connections: what happened to them.
    pub churn: crate::churn::ChurnReport,
    /// Up messages and their answers (the `up` scenario).
    #[serde(default)]
    pub up: Option<crate::up::UpReport>,
}

/// A histogram as base64 of its V2 serialization.
pub fn encode(histogram: &Histogram<u64>) -> Result<String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(histogram, &mut bytes)
        .map_err(|e| anyhow::anyhow!("serializing a histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The histogram [`encode`] made.
pub fn decode(text: &str) -> Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("histogram is not base64")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("deserializing a histogram: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_trip() {
        let mut h = crate::traffic::latency_histogram();
        for v in [1, 250, 250, 9_000, 1_200_000] {
            h.record(v).expect("in range");
        }
        let back = decode(&encode(&h).expect("encode")).expect("decode");
        assert_eq!(back.len(), 5);
        assert_eq!(back.max(), h.max());
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
    }
}
