//! Sampling parameters (vLLM's names and defaults) and the host-side sampler: greedy, or
//! temperature → top-k → top-p, with a per-request seeded RNG when `seed` is given.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::logprobs::MAX_LOGPROBS;
use crate::structured::Constraint;

/// Most choices (`n`) a request may ask for: each becomes a sequence of its own.
pub const MAX_CHOICES: usize = 128;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0 or -1 disables.
    pub top_k: i32,
    pub seed: Option<u64>,
    /// Most output tokens.
    pub max_tokens: usize,
    /// EOS and stop tokens are suppressed until this many tokens are out.
    pub min_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Return each output token's log-probability and this many most likely alternatives
    /// (vLLM's `logprobs`, at most [`MAX_LOGPROBS`]); `None`: none. See [`crate::logprobs`].
    pub logprobs: Option<usize>,
    /// The same for every prompt token after the first (vLLM's `prompt_logprobs`). Costs the
    /// logits of every prompt position, computed only for requests that ask.
    pub prompt_logprobs: Option<usize>,
    /// Choices of the request (vLLM's `n`). Choice 0 runs the prompt; the others fork from it
    /// after, sharing the prompt's KV blocks, each with its own RNG (seed + its index when
    /// seeded) and request id ([`crate::engine::choice_request_id`]).
    pub n: usize,
    /// Only these tokens may be sampled (vLLM's `allowed_token_ids`); `None`: any. A step with
    /// such a request samples on the host.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// Token sequences the output must not contain (vLLM's `bad_words`, tokenized): a
    /// sequence's last token is banned wherever the output ends with the ones before it (a
    /// one-token word always).
    pub bad_words_token_ids: Vec<Vec<u32>>,
    /// What the output must match (structured outputs, [`crate::structured`]); each choice
    /// follows it on its own.
    pub constraint: Option<Constraint>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens: 16,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            n: 1,
            allowed_token_ids: None,
            bad_words_token_ids: Vec::new(),
            constraint: None,
        }
    }
}

/// The tokens `bad_words` bans after `output`: each word's last token where the output ends
/// with the tokens before it (at once, for one-token words).
pub fn bad_word_bans<'a>(bad_words: &'a [Vec<u32>], output: &'a [u32]) -> impl Iterator<Item = u32> + 'a {
    bad_words.iter().filter_map(move |w| {
        let (last, prefix) = w.split_last()?;
        output.ends_with(prefix).then_some(*last)
    })
}

/// Keeps only the `allowed` entries of a row of logits (the others become -inf).
pub fn keep_allowed(row: &mut [f32], allowed: &[u32], scratch: &mut Vec<(u32, f32)>) {
    scratch.clear();
    scratch.extend(
        allowed
            .iter()
            .filter_map(|&t| row.get(t as usize).map(|&l| (t, l))),
    );
    row.fill(f32::NEG_INFINITY);
    for &(t, l) in scratch.iter() {
        row[t as usize] = l;
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field, msg: String| Err(Error::InvalidSamplingParams { field, msg });
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k < -1 {
            return bad(
                "top_k",
                format!("must be -1, 0 (disabled) or positive, got {}", self.top_k),
            );
        }
        if !(1..=MAX_CHOICES).contains(&self.n) {
            return bad("n", format!("must be from 1 to {MAX_CHOICES}, got {}", self.n));
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1".into());
        }
        if self.min_tokens > self.max_tokens {
            return bad(
                "min_tokens",
                format!(
                    "{} is greater than max_tokens {}",
                    self.min_tokens, self.max_tokens
                ),
            );
        }
        if self.allowed_token_ids.as_ref().is_some_and(Vec::is_empty) {
            return bad("allowed_token_ids", "must list at least one token id".into());
        }
        if self.bad_words_token_ids.iter().any(Vec::is_empty) {
            return bad("bad_words", "a bad word tokenizes to no tokens".into());
        }
        for (field, n) in [
            ("logprobs", self.logprobs),
            ("prompt_logprobs", self.prompt_logprobs),
        ] {
            if let Some(n) = n.filter(|&n| n > MAX_LOGPROBS) {
                return bad(field, format!("must be at most {MAX_LOGPROBS}, got {n}"));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Index of the largest value; the first one on ties, as `torch.argmax`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Reusable scratch space, so sampling does not allocate per token.
#[derive(Default)]
pub struct Sampler {
    probs: Vec<(f32, u32)>,
}

impl Sampler {
    /// Samples one token from `logits` (modified in place: masked tokens become -inf).
    /// `banned` tokens (EOS/stop ids before `min_tokens`) are never chosen.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        params: &SamplingParams,
        banned: &[u32],
        rng: &mut StdRng,
    ) -> u32 {
        for &b in banned {
            if let Some(l) = logits.get_mut(b as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        if params.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.probs.clear();
        self.probs.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (((l - max) * inv_t).exp(), i as u32)),
        );
        let k = if params.top_k > 0 {
            (params.top_k as usize).min(self.probs.len())
        } else {
            self.probs.len()
        };
        if k < self.probs.len() {
            self.probs
                .select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            self.probs.truncate(k);
        }
        if params.top_p < 1.0 {
            self.probs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
            let total: f32 = self.probs.iter().map(|p| p.0).sum();
            let mut cum = 0.0;
            let mut keep = self.probs.len();
            for (i, p) in self.probs.iter().enumerate() {
                cum += p.0 / total;
                if cum >= params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.probs.truncate(keep);
        }
        let total: f32 = self.probs.iter().map(|p| p.0).sum();
        let mut x = rng.random::<f32>() * total;
        for &(p, id) in &self.probs {
            if x < p {
                return id;
            }
            x -= p;
        }
        self.probs.last().map_or(argmax(logits), |p| p.1)
    }
}

/// The RNG of a request: from its seed, or from the engine's.
pub fn request_rng(seed: Option<u64>, engine_rng: &mut StdRng) -> StdRng {
    StdRng::seed_from_u64(seed.unwrap_or_else(|| engine_rng.random()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_words_ban_their_last_token_after_their_prefix() {
        let words = vec![vec![5], vec![1, 2, 3]];
        let bans = |out: &[u32]| bad_word_bans(&words, out).collect::<Vec<_>>();
        assert_eq!(bans(&[]), vec![5], "a one-token word is banned from the start");
        assert_eq!(bans(&[9, 1, 2]), vec![5, 3]);
        assert_eq!(bans(&[1, 2, 7]), vec![5], "only right after the prefix");
        assert_eq!(bans(&[2]), vec![5]);
    }

    #[test]
    fn only_allowed_tokens_keep_their_logits() {
        let mut row = vec![0.5, 1.0, 2.0, 3.0];
        keep_allowed(&mut row, &[3, 1, 99], &mut Vec::new());
        assert_eq!(row, vec![f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY, 3.0]);
    }

    #[test]
    fn greedy_takes_first_max_and_respects_bans() {
        let mut s = Sampler::default();
        let mut rng = StdRng::seed_from_u64(0);
        let p = SamplingParams::greedy(4);
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &p, &[], &mut rng), 1);
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &p, &[1], &mut rng), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_repeats() {
        let mut s = Sampler::default();
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 1,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(s.sample(&mut logits.clone(), &p, &[], &mut rng), argmax(&logits));

        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: Some(5),
            ..Default::default()
        };
        let draw = |s: &mut Sampler| {
            let mut rng = StdRng::seed_from_u64(5);
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &p, &[], &mut rng))
                .collect::<Vec<_>>()
        };
        let a = draw(&mut s);
        assert_eq!(a, draw(&mut s));
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 1,
            "sampling is not degenerate"
        );
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let mut s = Sampler::default();
        // token 0 holds ~88% of the mass: top_p 0.5 must always pick it
        let logits = [5.0f32, 3.0, 1.0, 0.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits.clone(), &p, &[], &mut rng), 0);
        }
    }

    #[test]
    fn validation_names_the_field() {
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("top_p"));
        let e = SamplingParams {
            min_tokens: 5,
            max_tokens: 2,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("min_tokens"));
    }
}
