//! Sampling on the device: the sampling kernel alone against host-computed top-k/top-p sets and
//! softmax frequencies, and through the engine (seeds, bans until `min_tokens`, the host
//! fallback). Skipped, with a note, where no CUDA driver is found (CI); the host side of the
//! kernel tests runs everywhere.

mod common;

use std::collections::HashMap;

use common::gpu::have_gpu;
use common::{case_dir, load, Golden, GoldenRequest};
use multilora_engine::backend::{RowSampling, SamplingBatch};
use multilora_engine::cuda::elem::Elem;
use multilora_engine::cuda::gpu::Gpu;
use multilora_engine::cuda::sampling::DeviceSampler;
use multilora_engine::sampling::argmax;
use multilora_engine::{Device, EngineConfig, LLMEngine, Prompt, SamplingParams};

/// An engine on the GPU over a golden case's model, without LoRA.
fn cuda_engine(case: &str, max_num_seqs: usize) -> LLMEngine {
    let mut cfg = EngineConfig::new(case_dir(case).join("model"));
    cfg.device = Device::Cuda;
    cfg.max_model_len = Some(256);
    cfg.max_num_seqs = max_num_seqs;
    LLMEngine::new(cfg).expect("engine loads")
}

// ---- the sampling kernel alone, on fixed logits rows ----

/// A fixed logits row: pseudo-random values in [-3, 3) and a few larger ones spread over the
/// row (so they fall to different threads of the block).
fn test_row(vocab: usize) -> Vec<f32> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut row: Vec<f32> = (0..vocab)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 6.0 - 3.0
        })
        .collect();
    for (k, &v) in [5.0f32, 4.5, 4.0, 3.5, 3.25].iter().enumerate() {
        row[(k * 7919 + 17) % vocab] = v;
    }
    row
}

/// What top-k then top-p keep, defined as the device does (thresholds on the logit, ties at a
/// threshold kept), with each kept token's renormalized probability. Banned ids are -inf.
fn allowed(row: &[f32], banned: &[u32], r: RowSampling) -> HashMap<u32, f64> {
    let mut l = row.to_vec();
    for &b in banned {
        l[b as usize] = f32::NEG_INFINITY;
    }
    let mut order: Vec<usize> = (0..l.len()).collect();
    order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
    let m = l[order[0]] as f64;
    let p = |i: usize| ((l[i] as f64 - m) / r.temperature as f64).exp();
    let mut cut = f32::NEG_INFINITY;
    if r.top_k > 0 && (r.top_k as usize) < l.len() {
        cut = l[order[r.top_k as usize - 1]];
    }
    if r.top_p < 1.0 {
        let total: f64 = order.iter().filter(|&&i| l[i] >= cut).map(|&i| p(i)).sum();
        let mut cum = 0.0;
        for &i in order.iter().filter(|&&i| l[i] >= cut) {
            cum += p(i) / total;
            // f32 sums on the device may differ from these in the 6th digit
            assert!(
                (cum - r.top_p as f64).abs() > 1e-4,
                "test design: a top-p boundary ({cum}) within rounding of top_p {}",
                r.top_p
            );
            if cum >= r.top_p as f64 {
                cut = l[i];
                break;
            }
        }
    }
    let kept: Vec<usize> = (0..l.len())
        .filter(|&i| l[i] >= cut && l[i] > f32::NEG_INFINITY)
        .collect();
    let z: f64 = kept.iter().map(|&i| p(i)).sum();
    kept.into_iter().map(|i| (i as u32, p(i) / z)).collect()
}

/// Every id is in the allowed set, and each token's frequency is within 5 sigma (plus 0.002) of
/// its probability.
fn check_draws(ids: &[u32], want: &HashMap<u32, f64>, what: &str) {
    let n = ids.len() as f64;
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for &id in ids {
        assert!(
            want.contains_key(&id),
            "{what}: drew token {id}, outside the {} tokens top-k/top-p allow (or banned)",
            want.len()
        );
        *counts.entry(id).or_default() += 1;
    }
    for (&id, &p) in want {
        let f = counts.get(&id).copied().unwrap_or(0) as f64 / n;
        let tol = 5.0 * (p * (1.0 - p) / n).sqrt() + 2e-3;
        assert!(
            (f - p).abs() <= tol,
            "{what}: token {id} drawn with frequency {f:.4} over {n} rows, softmax says {p:.4} (tolerance {tol:.4})"
        );
    }
}

/// Runs `sample_rows` once over `rows.len()` copies of `row`; returns the ids and the logits as
/// the kernel left them (banned ids at -inf).
fn device_sample(gpu: &Gpu, row: &[f32], rows: &[(RowSampling, Vec<u32>)]) -> (Vec<u32>, Vec<f32>) {
    let (n, vocab) = (rows.len(), row.len());
    let logits = gpu.alloc(n * vocab * 4).unwrap();
    gpu.htod(logits.ptr, &row.repeat(n)).unwrap();
    let mut batch = SamplingBatch::default();
    for (r, banned) in rows {
        batch.push(*r, banned.iter().copied());
    }
    let mut sampler = DeviceSampler::new(gpu, n).unwrap();
    sampler.upload(gpu, &batch, n).unwrap();
    sampler.record(gpu, logits.ptr, n, vocab).unwrap();
    sampler.download_ids(gpu, n).unwrap();
    let mut out = vec![0.0f32; n * vocab];
    gpu.dtoh(&mut out, logits.ptr).unwrap();
    (sampler.ids().to_vec(), out)
}

fn rows(n: usize, r: RowSampling, banned: &[u32], seed: u64) -> Vec<(RowSampling, Vec<u32>)> {
    (0..n as u64)
        .map(|i| {
            let random = (seed ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            (RowSampling { random, ..r }, banned.to_vec())
        })
        .collect()
}

fn sampled(temperature: f32, top_k: u32, top_p: f32) -> RowSampling {
    RowSampling {
        temperature,
        top_k,
        top_p,
        random: 0,
    }
}

/// Temperature, top-k, top-p and their mix: every draw inside the host's allowed set, draws
/// following the softmax, the same random numbers giving the same ids.
#[test]
fn cuda_sampling_follows_the_softmax() {
    let row = test_row(5000);
    let cases = [
        ("temperature 0.7", sampled(0.7, 0, 1.0)),
        ("top_k 5", sampled(1.0, 5, 1.0)),
        ("top_p 0.5 at temperature 0.5", sampled(0.5, 0, 0.5)),
        ("temperature 1.3, top_k 50, top_p 0.9", sampled(1.3, 50, 0.9)),
    ];
    // The host side runs everywhere: it checks the test's own top-p boundaries.
    let want: Vec<_> = cases.iter().map(|&(_, r)| allowed(&row, &[], r)).collect();
    if !have_gpu() {
        return;
    }
    let gpu = Gpu::new(0, Elem::Bf16).unwrap();
    for ((what, r), want) in cases.iter().zip(&want) {
        let (ids, _) = device_sample(&gpu, &row, &rows(8192, *r, &[], 1));
        check_draws(&ids, want, what);
        let (again, _) = device_sample(&gpu, &row, &rows(8192, *r, &[], 1));
        assert_eq!(ids, again, "{what}: the same random numbers drew different ids");
        let (other, _) = device_sample(&gpu, &row, &rows(8192, *r, &[], 2));
        assert_ne!(ids, other, "{what}: other random numbers drew the same 8192 ids");
    }
}

/// A vocabulary of Qwen2's size (many tokens per thread), with the most likely token banned.
#[test]
fn cuda_sampling_large_vocab_with_bans() {
    let row = test_row(152064);
    let top = argmax(&row);
    let r = sampled(1.0, 40, 0.95);
    let want = allowed(&row, &[top], r);
    if !have_gpu() {
        return;
    }
    let gpu = Gpu::new(0, Elem::Bf16).unwrap();
    let (ids, logits) = device_sample(&gpu, &row, &rows(1024, r, &[top], 3));
    assert!(!ids.contains(&top), "a banned token was drawn");
    check_draws(&ids, &want, "vocab 152064, top_k 40, top_p 0.95, argmax banned");
    assert_eq!(
        logits[top as usize],
        f32::NEG_INFINITY,
        "the kernel leaves banned logits at -inf"
    );
}

/// Greedy and sampled rows in one launch, some with bans: greedy rows take the host argmax of
/// the masked row; bans hold in both; logits of other tokens stay as they were.
#[test]
fn cuda_sampling_mixes_greedy_and_sampled_rows() {
    let row = test_row(5000);
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    let banned = order[..3].to_vec();
    let r = sampled(1.0, 4, 1.0);
    let (want_banned, want_free) = (allowed(&row, &banned, r), allowed(&row, &[], r));
    if !have_gpu() {
        return;
    }
    let gpu = Gpu::new(0, Elem::Bf16).unwrap();
    let greedy = RowSampling::default();
    let batch: Vec<(RowSampling, Vec<u32>)> = (0..512u64)
        .map(|i| {
            let bans = if i % 4 < 2 { banned.clone() } else { Vec::new() };
            let r = if i % 2 == 0 { greedy } else { r };
            (RowSampling { random: i, ..r }, bans)
        })
        .collect();
    let (ids, logits) = device_sample(&gpu, &row, &batch);
    let vocab = row.len();
    for (i, ((r, bans), &id)) in batch.iter().zip(&ids).enumerate() {
        let got = &logits[i * vocab..(i + 1) * vocab];
        for (t, (&g, &x)) in got.iter().zip(&row).enumerate() {
            let want = if bans.contains(&(t as u32)) {
                f32::NEG_INFINITY
            } else {
                x
            };
            assert_eq!(g, want, "row {i}: logit {t} after the kernel");
        }
        assert!(!bans.contains(&id), "row {i}: drew banned token {id}");
        if r.temperature == 0.0 {
            assert_eq!(
                id,
                argmax(got),
                "row {i}: greedy id vs host argmax of the masked row"
            );
        } else {
            let want = if bans.is_empty() { &want_free } else { &want_banned };
            assert!(
                want.contains_key(&id),
                "row {i}: {id} outside the top-4 of the masked row"
            );
        }
    }
}

// ---- sampling through the engine ----

/// Seeded requests sample the same tokens on every run, and EOS/stop ids stay banned until
/// min_tokens. Checked on the ids-only path (no logits copied back).
#[test]
fn cuda_engine_seeded_sampling_and_min_tokens() {
    if !have_gpu() {
        return;
    }
    let case = "llama";
    let golden = load(case);
    // A request of the base model (this engine has no adapters): its first greedy token is the
    // stop id to ban, so the ban has something to change.
    let base = base_request(&golden);
    let prompt = base.prompt_token_ids.clone();
    let stop = base.greedy_token_ids[0];
    let sample_once = || {
        let mut engine = cuda_engine(case, 16);
        let sampled = |seed| SamplingParams {
            temperature: 1.0,
            top_k: 20,
            top_p: 0.9,
            seed: Some(seed),
            max_tokens: 12,
            ignore_eos: true,
            ..Default::default()
        };
        let requests = [
            sampled(1),
            sampled(2),
            sampled(1),
            // greedy, its first greedy token a stop id banned for all 12 tokens
            SamplingParams {
                min_tokens: 12,
                stop_token_ids: vec![stop],
                ..SamplingParams::greedy(12)
            },
            // the same without the ban: it does draw the stop id first
            SamplingParams::greedy(12),
        ];
        for (i, p) in requests.into_iter().enumerate() {
            engine
                .add_request(&i.to_string(), Prompt::TokenIds(prompt.clone()), p, None)
                .unwrap();
        }
        let mut tokens = vec![Vec::new(); 5];
        while engine.has_unfinished_requests() {
            for o in engine.step().unwrap() {
                if o.is_finished() {
                    tokens[o.request_id.parse::<usize>().unwrap()] = o.output_token_ids;
                }
            }
        }
        tokens
    };
    let a = sample_once();
    assert_eq!(
        a,
        sample_once(),
        "seeded requests sampled differently on a second run"
    );
    assert_eq!(
        a[0], a[2],
        "two requests with seed 1 and the same prompt in one batch (identical rows compute identical logits)"
    );
    assert_eq!(a[4][0], stop, "the unbanned greedy twin starts with the stop id");
    assert!(
        !a[3].contains(&stop),
        "stop id {stop} drawn before min_tokens: {:?}",
        a[3]
    );
    assert_eq!(a[3].len(), 12);
}

/// The first golden request without an adapter.
fn base_request(golden: &Golden) -> &GoldenRequest {
    golden
        .requests
        .iter()
        .find(|r| r.lora.is_none())
        .expect("the llama fixture has a request without adapter")
}

/// A step whose banned ids overflow the device buffer (16 per sequence) is sampled on the host
/// from copied-back logits; the bans hold there too.
#[test]
fn cuda_engine_many_bans_fall_back_to_host_sampling() {
    if !have_gpu() {
        return;
    }
    let case = "llama";
    let golden = load(case);
    let mut engine = cuda_engine(case, 4);
    let base = base_request(&golden);
    let mut stop: Vec<u32> = (0..100).collect();
    stop.push(base.greedy_token_ids[0]);
    let params = SamplingParams {
        min_tokens: 8,
        stop_token_ids: stop.clone(),
        ..SamplingParams::greedy(8)
    };
    let prompt = base.prompt_token_ids.clone();
    engine
        .add_request("0", Prompt::TokenIds(prompt), params, None)
        .unwrap();
    let mut tokens = Vec::new();
    while engine.has_unfinished_requests() {
        for o in engine.step().unwrap() {
            let logits = engine
                .last_logits("0")
                .expect("host sampling keeps the logits it sampled from");
            assert!(stop.iter().all(|&t| logits[t as usize] == f32::NEG_INFINITY));
            if o.is_finished() {
                tokens = o.output_token_ids;
            }
        }
    }
    assert_eq!(tokens.len(), 8);
    assert!(
        tokens.iter().all(|t| !stop.contains(t)),
        "a banned id was drawn: {tokens:?}"
    );
}
