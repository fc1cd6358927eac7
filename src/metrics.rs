//! Prometheus metrics (`GET /metrics`, text exposition format).
//!
//! Counters are bumped where things happen; gauges of state (bots, tunnels by state,
//! pending events, certificate expiry) are read at scrape time. No label ever carries a
//! tunnel id or a peer JID; `bot` labels only the per-bot certificate expiry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label set with one `kind`-like value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why (a short stable code).
    pub reason: String,
}

/// Role and outcome of a tunnel.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Opened {
    /// `initiator` or `responder`.
    pub role: String,
    /// `established` or `failed`.
    pub result: String,
}

/// `in` or `out`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    /// `in` (from peers) or `out` (to peers).
    pub direction: String,
}

/// A tunnel state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// One of the states of spec §1.14.
    pub state: String,
}

/// The kind of a refusal.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// Which limit.
    pub kind: String,
}

/// A webhook delivery result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `delivered`, `failed` or `dead`.
    pub result: String,
}

/// A bot.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Bot {
    /// The bot's bare JID.
    pub bot: String,
}

/// The build.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Build {
    /// The crate version.
    pub version: String,
}

/// Every metric of the component.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// 1 while the component stream is authenticated.
    pub connected: Gauge,
    /// Links lost, by reason.
    pub reconnects: Family<Reason, Counter>,
    /// Bots.
    pub bots: Gauge,
    /// Live tunnels by state.
    pub tunnels: Family<StateLabel, Gauge>,
    /// Tunnels that reached the end of their handshake, by role and result.
    pub tunnels_opened: Family<Opened, Counter>,
    /// Seconds from creation to open.
    pub handshake_seconds: Histogram,
    /// Inner stanzas through tunnels.
    pub stanzas: Family<Direction, Counter>,
    /// TLS bytes through tunnels.
    pub bytes: Family<Direction, Counter>,
    /// Peers that presented a key differing from their pin.
    pub identity_changes: Counter,
    /// Work refused for capacity, by kind.
    pub limit_rejections: Family<Kind, Counter>,
    /// Tunnels that ended, by reason (deadlines and limits among them).
    pub tunnels_closed: Family<Reason, Counter>,
    /// Webhook attempts by result.
    pub webhook_deliveries: Family<Outcome, Counter>,
    /// Events no reader has acknowledged yet, over all bots.
    pub pending_events: Gauge,
    /// Each bot certificate's notAfter, Unix seconds.
    pub certificate_expiry: Family<Bot, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("xtls");
        let m = Metrics {
            connected: Gauge::default(),
            reconnects: Family::default(),
            bots: Gauge::default(),
            tunnels: Family::default(),
            tunnels_opened: Family::default(),
            handshake_seconds: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            stanzas: Family::default(),
            bytes: Family::default(),
            identity_changes: Counter::default(),
            limit_rejections: Family::default(),
            tunnels_closed: Family::default(),
            webhook_deliveries: Family::default(),
            pending_events: Gauge::default(),
            certificate_expiry: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "component_connected",
            "1 while the component stream is authenticated",
            m.connected.clone(),
        );
        registry.register(
            "component_reconnects",
            "Component streams lost, by reason",
            m.reconnects.clone(),
        );
        registry.register("bots", "Bots", m.bots.clone());
        registry.register("tunnels", "Live tunnels by state", m.tunnels.clone());
        registry.register(
            "tunnels_opened",
            "Tunnels whose handshake ended, by role and result",
            m.tunnels_opened.clone(),
        );
        registry.register(
            "handshake_duration_seconds",
            "Time from a tunnel's creation to open",
            m.handshake_seconds.clone(),
        );
        registry.register(
            "tunnel_stanzas",
            "Inner stanzas through tunnels, by direction",
            m.stanzas.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "TLS bytes through tunnels, by direction",
            m.bytes.clone(),
        );
        registry.register(
            "identity_changes",
            "Peers that presented a key other than the pinned one",
            m.identity_changes.clone(),
        );
        registry.register(
            "limit_rejections",
            "Work refused for capacity, by kind",
            m.limit_rejections.clone(),
        );
        registry.register(
            "tunnels_closed",
            "Tunnels that ended, by reason (e.g. timeout_handshake, idle, inner_xml)",
            m.tunnels_closed.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook attempts by result",
            m.webhook_deliveries.clone(),
        );
        registry.register(
            "pending_events",
            "Events no reader has acknowledged yet",
            m.pending_events.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "notAfter of each bot certificate",
            m.certificate_expiry.clone(),
        );
        let build: Family<Build, Gauge> = Family::default();
        build
            .get_or_create(&Build {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register("build_info", "The running build", build);
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Counts a tunnel that ended.
    pub fn closed(&self, reason: &xtls::tunnel::CloseReason) {
        let reason = match reason {
            xtls::tunnel::CloseReason::Timeout(which) => {
                format!("timeout_{}", which.replace(' ', "_"))
            }
            other => other.code().to_owned(),
        };
        self.tunnels_closed.get_or_create(&Reason { reason }).inc();
    }

    /// Counts a refusal.
    pub fn rejected(&self, kind: &str) {
        self.limit_rejections
            .get_or_create(&Kind { kind: kind.into() })
            .inc();
    }

    /// Counts TLS bytes and inner stanzas.
    pub fn traffic(&self, stanzas_in: u64, stanzas_out: u64, bytes_in: u64, bytes_out: u64) {
        for (family, value_in, value_out) in [
            (&self.stanzas, stanzas_in, stanzas_out),
            (&self.bytes, bytes_in, bytes_out),
        ] {
            if value_in > 0 {
                family
                    .get_or_create(&Direction {
                        direction: "in".into(),
                    })
                    .inc_by(value_in);
            }
            if value_out > 0 {
                family
                    .get_or_create(&Direction {
                        direction: "out".into(),
                    })
                    .inc_by(value_out);
            }
        }
    }

    /// Counts a tunnel whose handshake ended.
    pub fn opened(&self, role: &str, established: bool) {
        self.tunnels_opened
            .get_or_create(&Opened {
                role: role.into(),
                result: if established { "established" } else { "failed" }.into(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels_and_build_info() {
        let m = Metrics::default();
        m.connected.set(1);
        m.traffic(2, 3, 100, 200);
        m.opened("responder", true);
        m.rejected("tunnels_per_peer");
        m.closed(&xtls::tunnel::CloseReason::Timeout("handshake"));
        m.closed(&xtls::tunnel::CloseReason::Idle);
        let text = m.render();
        for line in [
            "xtls_component_connected 1",
            "xtls_tunnel_stanzas_total{direction=\"in\"} 2",
            "xtls_tunnel_bytes_total{direction=\"out\"} 200",
            "xtls_tunnels_opened_total{role=\"responder\",result=\"established\"} 1",
            "xtls_limit_rejections_total{kind=\"tunnels_per_peer\"} 1",
            "xtls_tunnels_closed_total{reason=\"timeout_handshake\"} 1",
            "xtls_tunnels_closed_total{reason=\"idle\"} 1",
            "xtls_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
