//! Seeded generators of realistic records.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const REGIONS: [&str; 5] = ["north", "south", "east", "west", "central"];
const CATEGORIES: [&str; 6] = ["books", "garden", "toys", "kitchen", "music", "sports"];

/// Order events as NDJSON lines, reproducible from a seed.
#[derive(Debug)]
pub struct OrderGenerator {
    rng: StdRng,
    next_id: u64,
    customers: u64,
    start_ms: i64,
    /// Milliseconds of event time between two orders.
    step_ms: i64,
}

impl OrderGenerator {
    pub fn new(seed: u64) -> OrderGenerator {
        OrderGenerator {
            rng: StdRng::seed_from_u64(seed),
            next_id: 1,
            customers: 10_000,
            start_ms: 1_735_689_600_000, // 2025-01-01T00:00:00Z
            step_ms: 1_000,
        }
    }

    /// The next order as one JSON object (no trailing newline).
    pub fn next_order(&mut self) -> String {
        let id = self.next_id;
        self.next_id += 1;
        let customer = self.rng.random_range(1..=self.customers);
        let product = self.rng.random_range(1..=500u32);
        let quantity = self.rng.random_range(1..=5u32);
        let price_cents = self.rng.random_range(199..=19_999u32);
        let region = REGIONS[self.rng.random_range(0..REGIONS.len())];
        let category = CATEGORIES[(product as usize) % CATEGORIES.len()];
        let ts = self.start_ms + (id as i64) * self.step_ms;
        format!(
            r#"{{"order_id":{id},"customer_id":"c{customer}","product_id":"p{product}","category":"{category}","region":"{region}","quantity":{quantity},"unit_price":{}.{:02},"ts":{ts}}}"#,
            price_cents / 100,
            price_cents % 100
        )
    }

    /// `n` orders as an NDJSON document.
    pub fn ndjson(&mut self, n: usize) -> String {
        let mut out = String::with_capacity(n * 180);
        for _ in 0..n {
            out.push_str(&self.next_order());
            out.push('\n');
        }
        out
    }
}

/// A value of exactly `len` bytes that names its own `id`, for tests that track records.
pub fn tagged_value(id: &str, len: usize) -> Vec<u8> {
    let mut v = format!(r#"{{"id":"{id}","pad":""#).into_bytes();
    let tail = b"\"}";
    while v.len() + tail.len() < len {
        v.push(b'x');
    }
    v.extend_from_slice(tail);
    v
}
