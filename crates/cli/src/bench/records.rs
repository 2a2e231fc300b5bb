//! What one measured batch produced, as plain records that any backend can fill (the in-process
//! engine today; an OpenAI-compatible server later), and the original's arithmetic on them.
//! Nothing here knows about the engine.

use anyhow::bail;
use serde::{Deserialize, Deserializer, Serialize};

/// One engine step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step's compute time: device events around the forward on a GPU, forward + sampling
    /// wall time on the CPU. The original's `step_latency_ms`.
    pub latency_ms: f64,
    /// Wall time of the whole `step()` call, scheduling and adapter activation included.
    pub wall_ms: f64,
    pub num_seqs: usize,
    pub num_prefill_tokens: usize,
    /// Of `num_prefill_tokens`, those of prompts prefilled over several steps (chunked
    /// prefill: `max_num_batched_tokens` split them).
    pub num_chunked_prefill_tokens: usize,
    pub num_decode_tokens: usize,
    /// Distinct adapters in the step.
    pub num_loras: usize,
    pub num_preempted: usize,
}

/// One request of a batch, with the timestamps the original reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestRecord {
    pub request_id: String,
    /// Adapter name (`None` for no-LoRA).
    pub lora: Option<String>,
    pub prompt_num_tokens: usize,
    pub output_num_tokens: usize,
    pub finish_reason: String,
    /// First token − first scheduled, seconds.
    #[serde(deserialize_with = "nan_if_null")]
    pub first_token_time_s: f64,
    /// Last token − first token, seconds.
    #[serde(deserialize_with = "nan_if_null")]
    pub completion_time_s: f64,
    /// Gaps between streamed chunks, seconds: what a client measures as inter-token latency
    /// (empty for the engine backend, whose per-token times are its steps).
    pub inter_token_latencies_s: Vec<f64>,
}

/// JSON writes an unknown time (NaN) as null; reading it back gives NaN again.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl RequestRecord {
    /// The original's `tokens_per_second`: output tokens / completion time (which spans the
    /// gaps between them, one fewer than the tokens — kept for comparability).
    pub fn tokens_per_second(&self) -> f64 {
        self.output_num_tokens as f64 / self.completion_time_s
    }

    /// The original's `latency`: completion time / output tokens, seconds.
    pub fn latency_s(&self) -> f64 {
        self.completion_time_s / self.output_num_tokens as f64
    }

    /// First token time + completion time: from the start (sent, or first scheduled) to the
    /// last token, seconds.
    pub fn e2e_s(&self) -> f64 {
        self.first_token_time_s + self.completion_time_s
    }

    /// vLLM's TPOT: (last token − first token) / (output tokens − 1), seconds; `None` for a
    /// single token.
    pub fn tpot_s(&self) -> Option<f64> {
        (self.output_num_tokens > 1).then(|| self.completion_time_s / (self.output_num_tokens - 1) as f64)
    }
}

/// Everything one measured batch produced.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BatchRun {
    /// Empty for backends that cannot see steps.
    pub steps: Vec<StepRecord>,
    pub requests: Vec<RequestRecord>,
    /// From the start of the first step to the end of the last.
    pub e2e_ms: f64,
}

/// The original's three numbers for one batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BatchLatency {
    /// Sum of the first S − (N − 1) steps.
    pub prefill_ms: f64,
    /// Mean of the last N − 1 steps: time per output token of the batch.
    pub decode_ms: f64,
    pub e2e_ms: f64,
    pub num_prefill_steps: usize,
    pub num_decode_steps: usize,
}

impl BatchLatency {
    /// Splits S steps into S − (N − 1) prefill steps and N − 1 decode steps, as the original
    /// does. Fails if there are too few steps to hold one prefill step.
    pub fn from_steps(step_ms: &[f64], num_tokens: usize, e2e_ms: f64) -> anyhow::Result<Self> {
        let num_decode_steps = num_tokens.saturating_sub(1);
        if num_decode_steps == 0 {
            bail!("num_tokens must be at least 2 to measure decode steps");
        }
        if step_ms.len() <= num_decode_steps {
            bail!(
                "the engine took {} steps to produce {num_tokens} tokens per request; at least {} (one or more prefill steps, then {num_decode_steps} decode steps) were expected",
                step_ms.len(),
                num_decode_steps + 1
            );
        }
        let (prefill, decode) = step_ms.split_at(step_ms.len() - num_decode_steps);
        Ok(BatchLatency {
            prefill_ms: prefill.iter().sum(),
            decode_ms: decode.iter().sum::<f64>() / decode.len() as f64,
            e2e_ms,
            num_prefill_steps: prefill.len(),
            num_decode_steps,
        })
    }

    /// What a client of a server can measure, with no steps to see: prefill = the slowest
    /// request's time to first token (when the whole batch has prefilled), decode = the mean
    /// over requests of (last token − first token) / (tokens − 1), the mean inter-token
    /// latency; e2e as measured.
    pub fn from_requests(requests: &[RequestRecord], e2e_ms: f64) -> anyhow::Result<Self> {
        let tpots: Vec<f64> = requests.iter().filter_map(RequestRecord::tpot_s).collect();
        if tpots.is_empty() {
            bail!("no request produced two tokens or more: no inter-token latency to measure");
        }
        let prefill_s = requests.iter().map(|r| r.first_token_time_s).fold(0.0, f64::max);
        let decode_s = tpots.iter().sum::<f64>() / tpots.len() as f64;
        Ok(BatchLatency {
            prefill_ms: prefill_s * 1e3,
            decode_ms: decode_s * 1e3,
            e2e_ms,
            num_prefill_steps: 0,
            num_decode_steps: 0,
        })
    }
}

/// Checks that a batch ran the way the original's arithmetic assumes; returns what differs as
/// readable notes (empty when the run is clean). Requests that did not produce exactly
/// `num_tokens` tokens are an error: the numbers would mean something else.
pub fn check(run: &BatchRun, batch_size: usize, num_tokens: usize) -> anyhow::Result<Vec<String>> {
    if run.requests.len() != batch_size {
        bail!("{} of {batch_size} requests finished", run.requests.len());
    }
    if let Some(r) = run.requests.iter().find(|r| r.output_num_tokens != num_tokens) {
        bail!(
            "request {} produced {} tokens (finish reason {:?}), not num_tokens {num_tokens}",
            r.request_id,
            r.output_num_tokens,
            r.finish_reason
        );
    }
    let mut notes = Vec::new();
    let num_decode = num_tokens - 1;
    if run.steps.len() > num_decode {
        let decode = &run.steps[run.steps.len() - num_decode..];
        let num_mixed = decode.iter().filter(|s| s.num_prefill_tokens > 0).count();
        if num_mixed > 0 {
            notes.push(format!(
                "{num_mixed} of the last {num_decode} steps also prefilled (the batch did not start together: max_loras, max_num_seqs, max_num_batched_tokens or the KV cache held some requests back)"
            ));
        }
        if let Some(s) = decode.iter().find(|s| s.num_seqs != batch_size) {
            notes.push(format!(
                "a decode step ran {} of the batch's {batch_size} sequences",
                s.num_seqs
            ));
        }
        let first = &run.steps[..run.steps.len() - num_decode];
        if first.len() > 1 {
            notes.push(format!("prefill took {} steps", first.len()));
        }
    }
    let num_chunked = run
        .steps
        .iter()
        .filter(|s| s.num_chunked_prefill_tokens > 0)
        .count();
    if num_chunked > 0 {
        notes.push(format!(
            "prefill chunked: {num_chunked} of {} steps ran a chunk of a prompt that max_num_batched_tokens (or long_prefill_token_threshold) split over several steps",
            run.steps.len()
        ));
    }
    let preempted: usize = run.steps.iter().map(|s| s.num_preempted).sum();
    if preempted > 0 {
        notes.push(format!("{preempted} preemptions (KV cache full)"));
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_steps_as_the_original() -> anyhow::Result<()> {
        // N = 4: 3 decode steps; 2 prefill steps before them.
        let l = BatchLatency::from_steps(&[10.0, 20.0, 1.0, 2.0, 3.0], 4, 40.0)?;
        assert_eq!(l.prefill_ms, 30.0);
        assert_eq!(l.decode_ms, 2.0);
        assert_eq!(l.e2e_ms, 40.0);
        assert_eq!((l.num_prefill_steps, l.num_decode_steps), (2, 3));
        let e = BatchLatency::from_steps(&[1.0, 2.0, 3.0], 4, 6.0).unwrap_err();
        assert!(format!("{e}").contains("3 steps"), "{e}");
        Ok(())
    }

    fn req(n: usize) -> RequestRecord {
        RequestRecord {
            request_id: "0".into(),
            lora: None,
            prompt_num_tokens: 5,
            output_num_tokens: n,
            finish_reason: "length".into(),
            first_token_time_s: 0.1,
            completion_time_s: 0.5,
            inter_token_latencies_s: Vec::new(),
        }
    }

    fn step(num_seqs: usize, prefill: usize) -> StepRecord {
        StepRecord {
            num_seqs,
            num_prefill_tokens: prefill,
            num_decode_tokens: num_seqs,
            ..Default::default()
        }
    }

    #[test]
    fn per_request_columns() {
        let r = req(4);
        assert_eq!(r.tokens_per_second(), 8.0);
        assert_eq!(r.latency_s(), 0.125);
        assert_eq!(r.e2e_s(), 0.6);
        assert!((r.tpot_s().unwrap_or(0.0) - 0.5 / 3.0).abs() < 1e-12);
        assert_eq!(req(1).tpot_s(), None);
    }

    #[test]
    fn check_flags_what_the_arithmetic_assumes() -> anyhow::Result<()> {
        let clean = BatchRun {
            steps: vec![step(2, 10), step(2, 0), step(2, 0)],
            requests: vec![req(3), req(3)],
            e2e_ms: 1.0,
        };
        assert!(check(&clean, 2, 3)?.is_empty());
        let waves = BatchRun {
            steps: vec![step(1, 5), step(2, 5), step(1, 0)],
            ..clean.clone()
        };
        let notes = check(&waves, 2, 3)?;
        assert!(notes.iter().any(|n| n.contains("also prefilled")), "{notes:?}");
        assert!(!notes.iter().any(|n| n.contains("chunked")), "{notes:?}");
        let mut chunked = clean.clone();
        chunked.steps[0].num_chunked_prefill_tokens = 4;
        let notes = check(&chunked, 2, 3)?;
        assert!(
            notes.iter().any(|n| n.contains("prefill chunked: 1 of 3 steps")),
            "{notes:?}"
        );
        assert!(check(&clean, 3, 3).is_err());
        assert!(check(&clean, 2, 4).is_err());
        Ok(())
    }
}
