//! A small deterministic random number generator whose whole state is a seed and a stream, shared
//! by training and by every runtime's sampler so that all of them draw the same numbers.
//!
//! Training must resume bit-exactly, so every random draw (initialisation, batch order, crops,
//! gumbel noise) comes from a stream derived from `(seed, purpose, step)` instead of a global
//! generator whose state would have to be saved.

use rand_xoshiro::rand_core::{RngCore, SeedableRng};
use rand_xoshiro::{SplitMix64, Xoshiro256PlusPlus};

/// xoshiro256++ (Blackman & Vigna) from `rand_xoshiro`, seeded through splitmix64, with the draws
/// (uniform, below, normal, gumbel, shuffle) defined here: they are part of what a seed means —
/// training resumes and every runtime samples from them — so they do not follow a crate's
/// distribution code from version to version (the tests pin the streams).
#[derive(Clone, Debug)]
pub struct Rng(Xoshiro256PlusPlus);

impl Rng {
    /// A generator seeded from one number: its state is splitmix64's first four outputs.
    pub fn new(seed: u64) -> Self {
        Rng(Xoshiro256PlusPlus::seed_from_u64(seed))
    }

    /// An independent stream for `(seed, purpose, index)`, e.g. the gumbel noise of step 1200.
    pub fn stream(seed: u64, purpose: &str, index: u64) -> Self {
        // FNV-1a over the purpose keeps streams of different purposes apart.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in purpose.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        let a = SplitMix64::seed_from_u64(seed ^ h.rotate_left(17)).next_u64();
        Rng::new(a ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n); `n` must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform float in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// One element of a slice, chosen uniformly; the slice must not be empty.
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Standard Gumbel: −ln(−ln u), u ∈ (0, 1).
    pub fn gumbel(&mut self) -> f64 {
        let u = (self.uniform() + f64::EPSILON).min(1.0 - f64::EPSILON);
        -(-u.ln()).ln()
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streams of before the crate (our own xoshiro256++ and splitmix64): a seed draws what
    /// it drew then, so trained runs resume and the bundled model's outputs stay as they were.
    #[test]
    fn streams_are_those_of_our_former_xoshiro() {
        let first3 = |seed| {
            let mut r = Rng::new(seed);
            [r.next_u64(), r.next_u64(), r.next_u64()]
        };
        assert_eq!(
            first3(0),
            [0x53175d61490b23df, 0x61da6f3dc380d507, 0x5c0fdf91ec9a7bfc]
        );
        assert_eq!(
            first3(42),
            [0xd0764d4f4476689f, 0x519e4174576f3791, 0xfbe07cfb0c24ed8c]
        );
        assert_eq!(
            first3(u64::MAX),
            [0x56ccf8ce948e27b2, 0xe68588432e5a5b90, 0xe3e9b5a48119ca8b]
        );
        let mut s = Rng::stream(7, "gumbel", 3);
        assert_eq!(
            [s.next_u64(), s.next_u64()],
            [0x8106a400af4822bd, 0x2ea52010103f24a4]
        );
    }

    #[test]
    fn streams_are_deterministic_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map(|_| Rng::stream(7, "gumbel", 3).next_u64())
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::stream(7, "gumbel", 3).next_u64(),
            Rng::stream(7, "gumbel", 4).next_u64()
        );
        assert_ne!(
            Rng::stream(7, "gumbel", 3).next_u64(),
            Rng::stream(7, "crop", 3).next_u64()
        );
    }

    #[test]
    fn below_stays_in_range_and_normal_has_unit_variance() {
        let mut r = Rng::new(1);
        assert!((0..10_000).all(|_| r.below(7) < 7));
        let xs: Vec<f64> = (0..20_000).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}
