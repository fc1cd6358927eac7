//! The per-peer `start` rate: a token bucket for each peer bare JID, shared by all bots, so
//! one peer cannot make the component run handshakes (or replace its own tunnels) without end.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// Buckets kept before full (idle) ones are dropped.
const MAX_TRACKED: usize = 10_000;

/// Token buckets of `start`s by peer bare JID.
#[derive(Debug)]
pub struct StartRate(Mutex<Buckets>);

#[derive(Debug)]
struct Buckets {
    per_second: f64,
    burst: f64,
    by_peer: HashMap<String, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl StartRate {
    /// `per_minute` starts per peer on average, `burst` at once.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        StartRate(Mutex::new(Buckets {
            per_second: f64::from(per_minute) / 60.0,
            burst: f64::from(burst.max(1)),
            by_peer: HashMap::new(),
        }))
    }

    /// Changes the rate and the burst; every peer's tokens so far are kept, up to the new
    /// burst.
    pub fn set_rate(&self, per_minute: u32, burst: u32) {
        let mut b = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        b.per_second = f64::from(per_minute) / 60.0;
        b.burst = f64::from(burst.max(1));
        let cap = b.burst;
        b.by_peer
            .values_mut()
            .for_each(|k| k.tokens = k.tokens.min(cap));
    }

    /// Takes one token for `peer`; `false` when it has none left.
    pub fn allow(&self, peer: &str, now: Instant) -> bool {
        let mut b = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (rate, burst) = (b.per_second, b.burst);
        if b.by_peer.len() >= MAX_TRACKED && !b.by_peer.contains_key(peer) {
            b.by_peer
                .retain(|_, k| refill(*k, now, rate, burst) < burst);
        }
        let bucket = b.by_peer.entry(peer.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let tokens = refill(*bucket, now, rate, burst);
        let allowed = tokens >= 1.0;
        *bucket = Bucket {
            tokens: if allowed { tokens - 1.0 } else { tokens },
            at: now,
        };
        allowed
    }
}

fn refill(b: Bucket, now: Instant, per_second: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * per_second).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate_per_peer() {
        let rate = StartRate::new(60, 3);
        let t0 = Instant::now();
        assert!((0..3).all(|_| rate.allow("mallory@evil", t0)));
        assert!(!rate.allow("mallory@evil", t0));
        // Another peer has its own bucket.
        assert!(rate.allow("alice@example", t0));
        // One per second comes back.
        assert!(!rate.allow("mallory@evil", t0 + Duration::from_millis(500)));
        assert!(rate.allow("mallory@evil", t0 + Duration::from_millis(1600)));
        assert!(!rate.allow("mallory@evil", t0 + Duration::from_millis(1700)));
        // Never more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(
            (0..10)
                .filter(|_| rate.allow("mallory@evil", later))
                .count(),
            3
        );
    }

    #[test]
    fn a_new_rate_applies_to_peers_already_counted() {
        let rate = StartRate::new(60, 5);
        let t0 = Instant::now();
        assert!(rate.allow("mallory@evil", t0));
        rate.set_rate(0, 2);
        // Four tokens were left; the new burst caps them at two, and none come back.
        assert!(rate.allow("mallory@evil", t0));
        assert!(rate.allow("mallory@evil", t0));
        assert!(!rate.allow("mallory@evil", t0 + Duration::from_secs(60)));
        // A new peer starts with the new burst.
        assert_eq!(
            (0..5).filter(|_| rate.allow("alice@example", t0)).count(),
            2
        );
    }

    #[test]
    fn many_peers_do_not_grow_the_table_without_bound() {
        let rate = StartRate::new(60, 2);
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED * 2) {
            rate.allow(
                &format!("p{i}@many"),
                t0 + Duration::from_secs(10 + i as u64),
            );
        }
        assert!(rate.0.lock().unwrap().by_peer.len() <= MAX_TRACKED + 1);
    }
}
