//! Turning logits into the next token: OpenAI's frequency and presence penalties, temperature,
//! top-k, top-p (nucleus) and a seeded generator, so that the same seed gives the same text.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Sampling parameters, with OpenAI's names, ranges and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 is greedy (argmax); up to 2.
    pub temperature: f32,
    /// Keep the most likely tokens whose probabilities add up to `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// The generator's seed; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// Subtracted from a token's logit once per time it has been generated (-2..=2).
    pub frequency_penalty: f32,
    /// Subtracted from a token's logit if it has been generated at all (-2..=2).
    pub presence_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::InvalidRequest(what.to_string()));
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad("temperature must be between 0 and 2");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be greater than 0 and at most 1");
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty)
            || !(-2.0..=2.0).contains(&self.presence_penalty)
        {
            return bad("frequency_penalty and presence_penalty must be between -2 and 2");
        }
        Ok(())
    }
}

/// Candidates sorted first when top-p needs a sorted list; enough for any peaked distribution.
const PARTIAL_SORT: usize = 256;

/// Per-sequence sampling state.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    counts: HashMap<u32, u32>,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            let mut b = [0u8; 8];
            // The OS generator does not fail on Linux once booted; a fixed fallback only makes
            // unseeded sampling repeatable, never less safe (sampling is not a secret).
            let _ = getrandom::fill(&mut b);
            u64::from_le_bytes(b)
        });
        Sampler {
            params,
            rng: Rng::new(seed),
            counts: HashMap::new(),
            candidates: Vec::new(),
        }
    }

    /// Picks the next token from `logits` (modified in place) and remembers it for penalties.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (tok, n) in &self.counts {
                if let Some(l) = logits.get_mut(*tok as usize) {
                    *l -= *n as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        let tok = if p.temperature == 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        *self.counts.entry(tok).or_insert(0) += 1;
        tok
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let (temp, top_k, top_p) = (
            self.params.temperature,
            self.params.top_k,
            self.params.top_p,
        );
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            (0u32..)
                .zip(logits.iter().map(|l| l / temp))
                .filter(|(_, l)| !l.is_nan()),
        );
        if c.is_empty() {
            return 0;
        }
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if top_k > 0 && top_k < c.len() {
            c.select_nth_unstable_by(top_k - 1, desc);
            c.truncate(top_k);
        }
        let max = c.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.1));
        let mut sum = 0.0f64;
        for x in c.iter_mut() {
            x.1 = (x.1 - max).exp();
            sum += f64::from(x.1);
        }
        if top_p < 1.0 {
            // Sort a prefix first: usually it already holds `top_p` of the mass.
            let mut sorted = c.len().min(PARTIAL_SORT);
            if sorted < c.len() {
                c.select_nth_unstable_by(sorted - 1, desc);
            }
            c.get_mut(..sorted)
                .unwrap_or_default()
                .sort_unstable_by(desc);
            let target = f64::from(top_p) * sum;
            let mut acc = 0.0f64;
            let mut keep = c.iter().take(sorted).position(|x| {
                acc += f64::from(x.1);
                acc >= target
            });
            if keep.is_none() {
                c.sort_unstable_by(desc);
                sorted = c.len();
                acc = 0.0;
                keep = c.iter().position(|x| {
                    acc += f64::from(x.1);
                    acc >= target
                });
            }
            let keep = keep.map_or(sorted, |i| i + 1);
            c.truncate(keep);
            sum = c.iter().map(|x| f64::from(x.1)).sum();
        } else {
            // A fixed order, so the same seed picks the same token whatever the selection did.
            c.sort_unstable_by_key(|x| x.0);
        }
        let mut r = self.rng.next_f64() * sum;
        for x in c.iter() {
            r -= f64::from(x.1);
            if r < 0.0 {
                return x.0;
            }
        }
        c.last().map_or(0, |x| x.0)
    }
}

/// The index of the largest logit (the first of equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, l) in (0u32..).zip(logits) {
        if *l > best.1 {
            best = (i, *l);
        }
    }
    best.0
}

/// xoshiro256** (Blackman and Vigna), seeded through SplitMix64: small, fast, and fixed
/// forever, so a seed means the same tokens in every version of this engine.
#[derive(Clone, Debug)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn logits() -> Vec<f32> {
        (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect()
    }

    #[test]
    fn seeding_matches_the_splitmix64_reference() {
        // SplitMix64's first outputs for seed 0 (Vigna's reference splitmix64.c).
        let r = Rng::new(0);
        assert_eq!(r.0[0], 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.0[1], 0x6E78_9E6A_A1B9_65F4);
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!((a.next_u64(), a.next_u64()), (b.next_u64(), b.next_u64()));
        assert_ne!(Rng::new(7).next_u64(), Rng::new(8).next_u64());
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        let mut l = logits();
        let best = argmax(&l);
        assert_eq!(l[best as usize], 10.0);
        assert_eq!(s.sample(&mut l), best);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let params = SamplingParams {
            seed: Some(42),
            top_p: 0.9,
            top_k: 50,
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(params.clone());
            (0..50).map(|_| s.sample(&mut logits())).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        let mut other = Sampler::new(SamplingParams {
            seed: Some(43),
            ..params.clone()
        });
        let b: Vec<u32> = (0..50).map(|_| other.sample(&mut logits())).collect();
        assert_ne!(a, b);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_choice() {
        let l = logits();
        let mut sorted: Vec<u32> = (0..1000).collect();
        sorted.sort_by(|a, b| l[*b as usize].total_cmp(&l[*a as usize]));
        let mut s = Sampler::new(SamplingParams {
            seed: Some(1),
            top_k: 3,
            temperature: 2.0,
            ..Default::default()
        });
        for _ in 0..200 {
            let t = s.sample(&mut logits());
            assert!(sorted[..3].contains(&t));
        }
        // With a tiny top_p only the single best token (ties: lowest id first) survives.
        let mut s = Sampler::new(SamplingParams {
            seed: Some(1),
            top_p: 1e-6,
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits()), sorted[0]);
        }
    }

    #[test]
    fn penalties_discourage_repeats() {
        let mut l = vec![0.0f32; 4];
        l[2] = 1.0;
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&mut l.clone()), 2);
        assert_ne!(s.sample(&mut l), 2);
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: -2.0,
            ..SamplingParams::greedy()
        });
        let mut l = vec![0.5f32, 0.0, 1.0];
        assert_eq!(s.sample(&mut l.clone()), 2);
        l[0] = 2.5;
        assert_eq!(
            s.sample(&mut l),
            2,
            "a negative presence penalty favours the token seen"
        );
    }

    #[test]
    fn out_of_range_parameters_are_rejected() {
        for p in [
            SamplingParams {
                temperature: 2.5,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                frequency_penalty: -3.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
        ] {
            assert!(p.validate().is_err(), "{p:?}");
        }
        assert!(SamplingParams::default().validate().is_ok());
    }
}
