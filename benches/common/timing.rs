//! Timing: samples and their percentiles, figures and ratios against their bounds, and the
//! ways of taking samples (a loop of one thing, things in turn, throughput).

use std::time::{Duration, Instant};

pub const ROUNDS: usize = 300;
pub const WARMUP: usize = 20;

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// p50 and p99 of a set of samples.
#[derive(Clone, Copy)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

pub fn report(label: &str, mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    let l = Latency {
        p50: percentile(&samples, 0.5).as_secs_f64(),
        p99: percentile(&samples, 0.99).as_secs_f64(),
    };
    println!(
        "{label:<48} p50 {:>8.3} ms   p99 {:>8.3} ms   ({} runs)",
        l.p50 * 1e3,
        l.p99 * 1e3,
        samples.len()
    );
    l
}

pub fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

/// Every figure of the run, for the JSON line at the end.
#[derive(Default)]
pub struct Figures(pub serde_json::Map<String, serde_json::Value>);

impl Figures {
    pub fn set(&mut self, key: &str, value: f64) {
        self.0
            .insert(key.into(), serde_json::json!((value * 1e4).round() / 1e4));
    }

    /// A target's ratio: printed with its bound and whether it is met, and recorded.
    pub fn ratio(&mut self, key: &str, value: f64, bound: Bound, what: &str) {
        let (met, text) = match bound {
            Bound::AtMost(b) => (value <= b, format!("at most {b}x")),
            Bound::AtLeast(b) => (value >= b, format!("at least {b}x")),
            Bound::Reported => {
                println!("  ratio {key}: {value:.2}x (no target)   {what}");
                self.set(key, value);
                return;
            }
        };
        println!(
            "  ratio {key}: {value:.2}x (target {text}: {})   {what}",
            if met { "met" } else { "NOT met" }
        );
        self.set(key, value);
    }
}

pub enum Bound {
    AtMost(f64),
    AtLeast(f64),
    /// Printed and recorded beside the targets, for comparison.
    Reported,
}

pub async fn time_n<F, Fut>(rounds: usize, mut f: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..WARMUP.min(rounds) {
        f().await;
    }
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        f().await;
        out.push(t.elapsed());
    }
    out
}

/// Times `a`, `b` and `c` in turn, round after round (after WARMUP rounds), the order turned
/// by one each round (so none always follows the same other): every sample of each sees the
/// machine as the others' do (caches, idle CPUs woken or not). A target compared with
/// baselines timed each in a loop of its own favours the baselines: a loop of Pings alone
/// keeps the bus path hot in a way an Exec, which forks between its call and its reply, never
/// is.
pub async fn time_in_turn<A, FA, B, FB, C, FC>(mut a: A, mut b: B, mut c: C) -> [Vec<Duration>; 3]
where
    A: FnMut() -> FA,
    FA: std::future::Future<Output = ()>,
    B: FnMut() -> FB,
    FB: std::future::Future<Output = ()>,
    C: FnMut() -> FC,
    FC: std::future::Future<Output = ()>,
{
    let mut out: [Vec<Duration>; 3] = Default::default();
    for round in 0..WARMUP + ROUNDS {
        for k in 0..3 {
            let which = (round + k) % 3;
            let t = Instant::now();
            match which {
                0 => a().await,
                1 => b().await,
                _ => c().await,
            }
            if round >= WARMUP {
                out[which].push(t.elapsed());
            }
        }
    }
    out
}

pub async fn time_async<F, Fut>(f: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    time_n(ROUNDS, f).await
}

/// Commands per second with 8 clients, each running `per_client` in a row.
pub async fn throughput<F, Fut>(f: F, per_client: usize) -> f64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let t = Instant::now();
    futures_util::future::join_all((0..8).map(|_| async {
        for _ in 0..per_client {
            f().await;
        }
    }))
    .await;
    (8 * per_client) as f64 / t.elapsed().as_secs_f64()
}
