//! Log-probabilities of tokens, as vLLM returns them for `logprobs` and `prompt_logprobs`.
//!
//! They are the log-softmax of the raw logits the model produced for the position, adapter
//! applied, before temperature, top-k/top-p and the `min_tokens` ban: vLLM's default
//! `logprobs_mode` (`raw_logprobs`). So they do not depend on how the token was sampled, and a
//! prompt/continuation pair scores the same whatever else the request asked for, which is what
//! lm-evaluation-harness needs of `echo` + `logprobs`.

/// vLLM's default `max_logprobs`: the most alternatives a request may ask for per token.
pub const MAX_LOGPROBS: usize = 20;

/// One token's log-probability, its rank, and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// 1 + the number of tokens strictly more likely (vLLM's `rank`).
    pub rank: u32,
    /// The `k` most likely tokens with their log-probabilities, most likely first (ties: the
    /// lower id first).
    pub top: Vec<(u32, f32)>,
}

/// Reusable scratch for [`token_logprob`], so a step does not allocate per row.
#[derive(Default)]
pub struct LogprobScratch {
    top: Vec<(f32, u32)>,
}

/// The log-probability of `token_id` under `logits` (`[vocab]`), and the `k` most likely tokens.
pub fn token_logprob(logits: &[f32], token_id: u32, k: usize, scratch: &mut LogprobScratch) -> TokenLogprob {
    assert!(
        (token_id as usize) < logits.len(),
        "token id inside the vocabulary"
    );
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Summed in f64: a 100k-entry vocabulary loses digits in an f32 sum.
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let logprob = |l: f32| (l as f64 - log_z) as f32;
    let chosen = logits[token_id as usize];
    let rank = 1 + logits.iter().filter(|&&l| l > chosen).count() as u32;
    let k = k.min(logits.len());
    let top = &mut scratch.top;
    top.clear();
    if k > 0 {
        top.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let by_rank = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if k < top.len() {
            top.select_nth_unstable_by(k - 1, by_rank);
            top.truncate(k);
        }
        top.sort_unstable_by(by_rank);
    }
    TokenLogprob {
        token_id,
        logprob: logprob(chosen),
        rank,
        top: top.iter().map(|&(l, id)| (id, logprob(l))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_rank_and_top_k() {
        let mut s = LogprobScratch::default();
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let lp = token_logprob(&logits, 2, 3, &mut s);
        assert!((lp.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6, "{lp:?}");
        assert_eq!(lp.rank, 3, "two tokens are more likely");
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2], "most likely first, ties by id");
        assert!((lp.top[0].1 as f64 - (3.0 - z.ln())).abs() < 1e-6);
        let probs: f64 = (0..5)
            .map(|t| (token_logprob(&logits, t, 0, &mut s).logprob as f64).exp())
            .sum();
        assert!((probs - 1.0).abs() < 1e-6, "probabilities sum to {probs}");
        assert!(token_logprob(&logits, 0, 0, &mut s).top.is_empty());
        assert_eq!(
            token_logprob(&logits, 0, 50, &mut s).top.len(),
            5,
            "k capped at the vocab"
        );
    }

    #[test]
    fn masked_logits_give_minus_infinity_not_nan() {
        let mut s = LogprobScratch::default();
        let lp = token_logprob(&[f32::NEG_INFINITY, 0.0], 0, 1, &mut s);
        assert_eq!(lp.logprob, f32::NEG_INFINITY);
        assert_eq!(lp.top, vec![(1, 0.0)]);
    }
}
