//! Endpoint selection policies. Pure: no I/O, no knowledge of connections.
//!
//! Selection order and eligibility are separate concerns: the caller says which candidates
//! are eligible (healthy, not ejected, not draining, below `max_conns`) and the policy only
//! orders them. One predicate therefore skips unhealthy and full endpoints for every policy.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// What a policy may know about an endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Relative weight (≥ 1).
    pub weight: u32,
    /// Requests currently holding a connection to it.
    pub load: usize,
    /// A stable hash of the endpoint's identity (its address), for consistent hashing.
    pub id_hash: u64,
}

/// The policy names of the config, ready to pick.
#[derive(Debug)]
pub enum Balancer {
    /// Smooth weighted round robin (nginx's algorithm: no bursts to one endpoint).
    RoundRobin(Mutex<Vec<i64>>),
    /// Fewest in-flight requests relative to weight; ties rotate.
    LeastConn(AtomicUsize),
    /// Power of two random choices on in-flight requests relative to weight.
    P2c,
    /// Rendezvous hashing of a per-request key (client IP or a cookie): adding one endpoint
    /// moves only about 1/N of the keys, and a full or down endpoint spills to the next in
    /// the key's own ranking.
    Hash,
}

impl Balancer {
    /// A round robin balancer for `n` endpoints.
    pub fn round_robin(n: usize) -> Balancer {
        Balancer::RoundRobin(Mutex::new(vec![0; n]))
    }

    /// A least-connections balancer.
    pub fn least_conn() -> Balancer {
        Balancer::LeastConn(AtomicUsize::new(0))
    }

    /// Picks one eligible candidate. `key` is the hash key for [`Balancer::Hash`]; without
    /// one (no cookie yet) hashing falls back to least-connections.
    pub fn pick(
        &self,
        cands: &[Candidate],
        eligible: &dyn Fn(usize) -> bool,
        key: Option<u64>,
    ) -> Option<usize> {
        match self {
            Balancer::RoundRobin(state) => {
                let mut cur = state.lock().unwrap_or_else(|e| e.into_inner());
                if cur.len() != cands.len() {
                    cur.resize(cands.len(), 0);
                }
                let mut total = 0i64;
                let mut best: Option<usize> = None;
                for (i, c) in cands.iter().enumerate() {
                    if !eligible(i) {
                        continue;
                    }
                    let w = i64::from(c.weight.max(1));
                    cur[i] += w;
                    total += w;
                    if best.is_none_or(|b| cur[i] > cur[b]) {
                        best = Some(i);
                    }
                }
                if let Some(b) = best {
                    cur[b] -= total;
                }
                best
            }
            Balancer::LeastConn(rot) => least_loaded(cands, eligible, rot),
            Balancer::P2c => {
                let idx: Vec<usize> = (0..cands.len()).filter(|&i| eligible(i)).collect();
                match idx.len() {
                    0 => None,
                    1 => Some(idx[0]),
                    n => {
                        let a = (next_random() % n as u64) as usize;
                        let mut b = (next_random() % (n as u64 - 1)) as usize;
                        if b >= a {
                            b += 1;
                        }
                        let (a, b) = (idx[a], idx[b]);
                        Some(if lighter(&cands[b], &cands[a]) { b } else { a })
                    }
                }
            }
            Balancer::Hash => match key {
                Some(k) => rendezvous(cands, eligible, k),
                None => least_loaded(cands, eligible, &AtomicUsize::new(next_random() as usize)),
            },
        }
    }
}

/// `a` is strictly less loaded than `b` relative to their weights.
fn lighter(a: &Candidate, b: &Candidate) -> bool {
    // load_a / w_a < load_b / w_b without division.
    (a.load as u128) * u128::from(b.weight.max(1)) < (b.load as u128) * u128::from(a.weight.max(1))
}

fn least_loaded(
    cands: &[Candidate],
    eligible: &dyn Fn(usize) -> bool,
    rot: &AtomicUsize,
) -> Option<usize> {
    let n = cands.len();
    if n == 0 {
        return None;
    }
    // Start at a rotating offset so that ties (the idle case) spread instead of always
    // landing on the first endpoint.
    let start = rot.fetch_add(1, Ordering::Relaxed) % n;
    let mut best: Option<usize> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if eligible(i) && best.is_none_or(|b| lighter(&cands[i], &cands[b])) {
            best = Some(i);
        }
    }
    best
}

fn rendezvous(cands: &[Candidate], eligible: &dyn Fn(usize) -> bool, key: u64) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, c) in cands.iter().enumerate() {
        if !eligible(i) {
            continue;
        }
        // Weighted rendezvous: score = w / -ln(u), u uniform in (0,1) from hash(key, id).
        let h = mix(key ^ mix(c.id_hash));
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(c.weight.max(1)) / -u.ln();
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

/// splitmix64 finaliser: a fast, well-distributed 64-bit mix.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over bytes, then mixed: a stable hash for endpoint ids and hash keys.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let local = 0u8;
    mix(t ^ (&local as *const u8 as u64))
}

/// A per-thread xorshift generator: p2c needs speed, not cryptographic quality.
fn next_random() -> u64 {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Candidate {
                weight: w,
                load: 0,
                id_hash: hash_bytes(format!("10.0.0.{i}:9000").as_bytes()),
            })
            .collect()
    }

    #[test]
    fn smooth_round_robin_honours_weights_without_bursts() {
        let c = cands(&[3, 1]);
        let b = Balancer::round_robin(2);
        let picks: Vec<usize> = (0..8)
            .map(|_| b.pick(&c, &|_| true, None).unwrap())
            .collect();
        // nginx's smooth WRR for 3:1 interleaves: a a b a | a a b a
        assert_eq!(picks, vec![0, 0, 1, 0, 0, 0, 1, 0]);
        let mut n = [0; 2];
        for _ in 0..10_000 {
            n[b.pick(&c, &|_| true, None).unwrap()] += 1;
        }
        assert_eq!(n, [7500, 2500]);
    }

    #[test]
    fn round_robin_skips_ineligible() {
        let c = cands(&[1, 1, 1]);
        let b = Balancer::round_robin(3);
        for _ in 0..30 {
            assert_ne!(b.pick(&c, &|i| i != 1, None), Some(1));
        }
        assert_eq!(b.pick(&c, &|_| false, None), None);
    }

    #[test]
    fn least_conn_prefers_lower_relative_load() {
        let mut c = cands(&[1, 2]);
        c[0].load = 2;
        c[1].load = 3; // 1.5 per weight < 2
        let b = Balancer::least_conn();
        for _ in 0..10 {
            assert_eq!(b.pick(&c, &|_| true, None), Some(1));
        }
        // Ties rotate.
        let c = cands(&[1, 1, 1]);
        let mut seen = [0; 3];
        for _ in 0..30 {
            seen[b.pick(&c, &|_| true, None).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&n| n == 10), "{seen:?}");
    }

    #[test]
    fn p2c_never_picks_the_most_loaded_of_two() {
        let mut c = cands(&[1, 1]);
        c[0].load = 5;
        for _ in 0..100 {
            assert_eq!(Balancer::P2c.pick(&c, &|_| true, None), Some(1));
        }
        let c = cands(&[1, 1, 1, 1]);
        let mut seen = [0; 4];
        for _ in 0..4000 {
            seen[Balancer::P2c.pick(&c, &|_| true, None).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn rendezvous_weights_and_stability() {
        let c = cands(&[3, 1]);
        let mut n = [0; 2];
        for k in 0..10_000u64 {
            n[Balancer::Hash.pick(&c, &|_| true, Some(mix(k))).unwrap()] += 1;
        }
        let share = f64::from(n[0]) / 10_000.0;
        assert!((share - 0.75).abs() < 0.03, "share {share}");

        // Adding a fifth endpoint moves about 1/5 of the keys, and only to the new one.
        let four = cands(&[1, 1, 1, 1]);
        let five = cands(&[1, 1, 1, 1, 1]);
        let mut moved = 0;
        for k in 0..10_000u64 {
            let a = Balancer::Hash.pick(&four, &|_| true, Some(mix(k))).unwrap();
            let b = Balancer::Hash.pick(&five, &|_| true, Some(mix(k))).unwrap();
            if a != b {
                assert_eq!(b, 4);
                moved += 1;
            }
        }
        let frac = f64::from(moved) / 10_000.0;
        assert!(frac < 0.2 + 0.03, "moved {frac}");
    }

    #[test]
    fn hash_spills_to_next_rank_when_preferred_is_ineligible() {
        let c = cands(&[1, 1, 1]);
        let first = Balancer::Hash.pick(&c, &|_| true, Some(42)).unwrap();
        let second = Balancer::Hash.pick(&c, &|i| i != first, Some(42)).unwrap();
        assert_ne!(first, second);
        assert_eq!(
            Balancer::Hash.pick(&c, &|i| i != first, Some(42)),
            Some(second)
        );
    }
}
