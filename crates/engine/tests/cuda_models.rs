//! The CUDA backend against the golden fixtures (transformers + PEFT, f32) and against itself
//! (graphs vs eager), with weights, activations and KV cache in bf16 and again in f16. 16-bit
//! weights make logits differ by rounding, so tokens are compared for the first steps and logits
//! within a tolerance of the element type. Tokens are sampled on the device: greedy ids are
//! checked against the host argmax of the device's logits. Skipped, with a note, where no CUDA
//! driver is found (CI).

mod common;

use std::collections::HashMap;

use common::gpu::{cpu_next_logits, have_gpu, logits_tolerance};
use common::{
    add_requests, case_config, case_dir, load, lora_requests, max_abs, max_diff, Golden, GoldenRequest,
    GQA_CASES,
};
use multilora_engine::cuda::elem::Elem;
use multilora_engine::sampling::argmax;
use multilora_engine::{Device, EngineConfig, LLMEngine, Prompt, SamplingParams};

struct Run {
    tokens: Vec<Vec<u32>>,
    first_logits: Vec<Vec<f32>>,
    /// logits of output token [`DECODE_CHECK_TOKEN`], drawn in a decode step (fused LoRA kernels)
    decode_logits: Vec<Vec<f32>>,
}

/// The output token whose decode-step logits are checked against the CPU backend.
const DECODE_CHECK_TOKEN: usize = 6;

/// Runs the golden requests greedily on the GPU, in `elem`. With `return_logits` every step's
/// device id is checked against the host argmax of the logits it was drawn from; without, no
/// logits come back.
fn run(case: &str, golden: &Golden, elem: Elem, enforce_eager: bool, return_logits: bool) -> Run {
    let all: Vec<usize> = (0..golden.requests.len()).collect();
    run_some(case, golden, elem, enforce_eager, return_logits, &all)
}

/// [`run`] for the golden requests `which` only (the others' entries stay empty).
fn run_some(
    case: &str,
    golden: &Golden,
    elem: Elem,
    enforce_eager: bool,
    return_logits: bool,
    which: &[usize],
) -> Run {
    let mut cfg = case_config(case);
    cfg.device = Device::Cuda;
    cfg.dtype = elem.name().into();
    cfg.enforce_eager = enforce_eager;
    cfg.return_logits = return_logits;
    cfg.max_num_seqs = 16;
    let mut engine = LLMEngine::new(cfg).expect("engine loads");
    assert_eq!(
        engine.resolved().dtype,
        elem.name(),
        "{case}: the dtype the engine ran"
    );
    add_requests(&mut engine, golden, &lora_requests(case), which);
    let k = golden.requests.len();
    let mut out = Run {
        tokens: vec![Vec::new(); k],
        first_logits: vec![Vec::new(); k],
        decode_logits: vec![Vec::new(); k],
    };
    while engine.has_unfinished_requests() {
        for o in engine.step().unwrap() {
            let i: usize = o.request_id.parse().unwrap();
            let logits = engine.last_logits(&o.request_id);
            if !return_logits {
                assert!(logits.is_none(), "{case}: logits came back without return_logits");
                if o.is_finished() {
                    out.tokens[i] = o.output_token_ids;
                }
                continue;
            }
            let logits = logits.expect("return_logits keeps each step's logits");
            let (got, want) = (o.token_id.unwrap(), argmax(logits));
            assert_eq!(
                got, want,
                "{case} request {i} token {} (eager {enforce_eager}): the device's greedy id is not the host argmax of the device's logits ({} vs {})",
                o.num_output_tokens, logits[got as usize], logits[want as usize]
            );
            if o.num_output_tokens == 1 {
                out.first_logits[i] = logits.to_vec();
            }
            if o.num_output_tokens == DECODE_CHECK_TOKEN {
                out.decode_logits[i] = logits.to_vec();
            }
            if o.is_finished() {
                out.tokens[i] = o.output_token_ids;
            }
        }
    }
    out
}

/// Number of leading tokens two sequences share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn check_case(case: &str, elem: Elem) {
    if !have_gpu() {
        return;
    }
    let golden = load(case);
    let tol = logits_tolerance(elem);
    let graphs = run(case, &golden, elem, false, true);
    let eager = run(case, &golden, elem, true, true);
    let ids_only = run(case, &golden, elem, false, false);
    for (i, r) in golden.requests.iter().enumerate() {
        let rel = max_diff(&graphs.first_logits[i], &r.first_logits) / max_abs(&r.first_logits).max(1e-6);
        let same = common_prefix(&graphs.tokens[i], &r.greedy_token_ids);
        eprintln!(
            "{case} ({}) request {i} (adapter {:?}): first-logits max rel diff {rel:.2e}, {same}/{} greedy tokens match PEFT",
            elem.name(),
            r.lora,
            r.greedy_token_ids.len()
        );
        // Later greedy tokens may flip on near-ties (scripts/gpu_check_peft.py compares longer
        // runs on a larger model).
        assert!(
            rel < tol,
            "{case} ({}) request {i}: first logits differ by {rel} (relative)",
            elem.name()
        );
        assert!(
            same >= 1,
            "{case} request {i}: first token {:?} vs PEFT {:?}",
            graphs.tokens[i],
            r.greedy_token_ids
        );
        // Graph replay computes exactly what eager launches compute.
        assert_eq!(
            graphs.tokens[i], eager.tokens[i],
            "{case} request {i}: graph vs eager tokens"
        );
        // Copying logits back changes nothing the device samples.
        assert_eq!(
            graphs.tokens[i], ids_only.tokens[i],
            "{case} request {i}: tokens with return_logits vs ids only"
        );
        // A decode step (graph, fused LoRA expand in RoPE and RMSNorm) against the CPU backend
        // prefilling the same tokens.
        check_decode_step(case, elem, r, i, &graphs, "the whole batch");
        let d = max_diff(&graphs.first_logits[i], &eager.first_logits[i]);
        assert!(
            d <= 1e-5,
            "{case} request {i}: graph vs eager logits differ by {d}"
        );
    }
    // The requests without an adapter on their own: decode steps of at most 8 sequences without
    // LoRA, whose RMSNorms in bf16 are split across the GEMMs around them (skinny.rs, NormIo).
    let base: Vec<usize> = (0..golden.requests.len())
        .filter(|&i| golden.requests[i].lora.is_none())
        .take(8)
        .collect();
    let solo = run_some(case, &golden, elem, false, true, &base);
    for &i in &base {
        let batch = format!("{} requests without LoRA", base.len());
        check_decode_step(case, elem, &golden.requests[i], i, &solo, &batch);
    }
}

/// Golden request `r` (index `i`): its logits of output token [`DECODE_CHECK_TOKEN`] in `run` (a
/// decode step) against the CPU backend prefilling the same tokens, within the element type's
/// tolerance.
fn check_decode_step(case: &str, elem: Elem, r: &GoldenRequest, i: usize, run: &Run, batch: &str) {
    let loras = lora_requests(case);
    let prefix = &run.tokens[i][..DECODE_CHECK_TOKEN - 1];
    let want = cpu_next_logits(
        case,
        &r.prompt_token_ids,
        prefix,
        r.lora.as_ref().map(|n| &loras[n]),
    );
    let rel = max_diff(&run.decode_logits[i], &want) / max_abs(&want).max(1e-6);
    eprintln!(
        "{case} ({}) request {i} (adapter {:?}, {batch}): decode-step logits vs CPU max rel diff {rel:.2e}",
        elem.name(),
        r.lora
    );
    assert!(
        rel < logits_tolerance(elem),
        "{case} ({}) request {i} ({batch}): logits of output token {DECODE_CHECK_TOKEN} (a decode step) differ from the CPU backend's by {rel} (relative)",
        elem.name()
    );
}

#[test]
fn cuda_llama_mixed_adapters() {
    check_case("llama", Elem::Bf16);
}

#[test]
fn cuda_llama3_tied() {
    check_case("llama3_tied", Elem::Bf16);
}

#[test]
fn cuda_qwen2_bias() {
    check_case("qwen2_bf16_sharded", Elem::Bf16);
}

#[test]
fn cuda_qwen3_qk_norm() {
    check_case("qwen3", Elem::Bf16);
}

#[test]
fn cuda_mistral() {
    check_case("mistral", Elem::Bf16);
}

#[test]
fn cuda_f16_llama_mixed_adapters() {
    check_case("llama", Elem::F16);
}

#[test]
fn cuda_f16_llama3_tied() {
    check_case("llama3_tied", Elem::F16);
}

#[test]
fn cuda_f16_qwen2_bias() {
    check_case("qwen2_bf16_sharded", Elem::F16);
}

#[test]
fn cuda_f16_qwen3_qk_norm() {
    check_case("qwen3", Elem::F16);
}

#[test]
fn cuda_f16_mistral() {
    check_case("mistral", Elem::F16);
}

/// The untuned shapes with 2k-token prompts (`common::GQA_CASES`): GQA ratios 1 to 8, head sizes
/// 8 to 24 (the f32 attention fallback for 24), ranks to 64 on all seven projections.
#[test]
fn cuda_untuned_shapes_and_long_prompts() {
    for case in GQA_CASES {
        check_case(case, Elem::Bf16);
    }
}

/// Asking for CUDA where there is none is a clear error, not a panic.
#[test]
fn cuda_without_driver_is_an_error() {
    if multilora_engine::cuda::gpu::probe().is_ok() {
        return;
    }
    let mut cfg = EngineConfig::new(case_dir("llama").join("model"));
    cfg.device = Device::Cuda;
    cfg.max_model_len = Some(256);
    let err = LLMEngine::new(cfg).err().expect("no CUDA here");
    assert!(err.to_string().contains("use device=cpu"), "{err}");
}

/// `logprobs` and `prompt_logprobs` on the GPU (a step that wants them samples on the host from
/// the device's logits; prompt rows come from `token_logits`) against the CPU backend's, with
/// adapters, a prompt in one step and in chunks: the same tokens scored, within the 16-bit
/// tolerance.
#[test]
fn cuda_logprobs_match_cpu() {
    if !have_gpu() {
        return;
    }
    let case = "llama";
    let golden = load(case);
    let loras = lora_requests(case);
    let run = |device: Device, max_num_batched_tokens: Option<usize>| {
        let mut cfg = case_config(case);
        cfg.device = device;
        cfg.max_num_seqs = 8;
        cfg.max_num_batched_tokens = max_num_batched_tokens;
        let mut engine = LLMEngine::new(cfg).expect("engine loads");
        for (i, r) in golden.requests.iter().enumerate() {
            let params = SamplingParams {
                ignore_eos: true,
                logprobs: Some(3),
                prompt_logprobs: Some(2),
                ..SamplingParams::greedy(4)
            };
            let lora = r.lora.as_ref().map(|n| &loras[n]);
            let prompt = Prompt::TokenIds(r.prompt_token_ids.clone());
            engine.add_request(&i.to_string(), prompt, params, lora).unwrap();
        }
        let mut outs: HashMap<String, Vec<multilora_engine::RequestOutput>> = HashMap::new();
        while engine.has_unfinished_requests() {
            for o in engine.step().unwrap() {
                outs.entry(o.request_id.to_string()).or_default().push(o);
            }
        }
        outs
    };
    let cpu = run(Device::Cpu, None);
    // A logprob carries its logit's error and the log-sum-exp's.
    let tol = 2.0 * logits_tolerance(Elem::Bf16);
    for chunk in [None, Some(8)] {
        let gpu = run(Device::Cuda, chunk);
        for (id, want) in &cpu {
            let got = &gpu[id];
            let (pw, pg) = (
                want[0].prompt_logprobs.as_ref().unwrap(),
                got[0].prompt_logprobs.as_ref().unwrap(),
            );
            assert_eq!(pw.len(), pg.len());
            for (j, (w, g)) in pw.iter().zip(pg).enumerate().skip(1) {
                let (w, g) = (w.as_ref().unwrap(), g.as_ref().unwrap());
                assert_eq!(w.token_id, g.token_id);
                assert!(
                    (w.logprob - g.logprob).abs() < tol,
                    "request {id} prompt {j}: {w:?} vs {g:?}"
                );
            }
            // The first output token is the same greedy one; later ones may diverge in bf16.
            let (w, g) = (
                want[0].logprobs.as_ref().unwrap(),
                got[0].logprobs.as_ref().unwrap(),
            );
            assert_eq!(w.token_id, g.token_id, "request {id}");
            assert!(
                (w.logprob - g.logprob).abs() < tol,
                "request {id}: {w:?} vs {g:?}"
            );
            assert_eq!(g.top.len(), 3);
        }
    }
}

/// Structured outputs and `allowed_token_ids` on the GPU (such a step samples on the host from
/// the device's logits): on the demo model, seeded sampled requests held to a choice and to a
/// short allowed set obey, and a free greedy request beside them draws what it draws beside the
/// same requests unconstrained (no mask leaks into its row). The free row asks for logprobs, so
/// both runs sample every step on the host (the device sampler draws differently from the
/// host's), and is greedy: the batches differ once the constrained requests end early, and only
/// a near-tie could tell their GEMM shapes apart.
#[test]
fn cuda_constrained_requests_obey_beside_free_ones() {
    if !have_gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    multilora_engine::demo::write_demo_model(&model, 1).unwrap();
    let choices = ["red", "green", "blue"];
    let run = |constrained: bool| {
        let mut cfg = EngineConfig::new(&model);
        cfg.device = Device::Cuda;
        cfg.max_model_len = Some(128);
        cfg.max_num_seqs = 8;
        let mut engine = LLMEngine::new(cfg).expect("engine loads");
        let sampled = |seed| SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            max_tokens: 12,
            ..Default::default()
        };
        let free = SamplingParams {
            temperature: 0.0,
            logprobs: Some(0),
            ignore_eos: true,
            ..sampled(9)
        };
        engine
            .add_request("free", Prompt::Text("Once upon a time".into()), free, None)
            .unwrap();
        for seed in 0..4 {
            let p = SamplingParams {
                constraint: constrained.then(|| {
                    multilora_engine::Constraint::Choice(choices.iter().map(|c| c.to_string()).collect())
                }),
                ..sampled(seed)
            };
            let id = format!("choice-{seed}");
            engine
                .add_request(&id, Prompt::Text("Pick a colour:".into()), p, None)
                .unwrap();
        }
        let p = SamplingParams {
            allowed_token_ids: constrained.then(|| vec![40, 41, 42]),
            ignore_eos: true,
            ..sampled(5)
        };
        engine
            .add_request("allowed", Prompt::Text("Hi".into()), p, None)
            .unwrap();
        let mut outs: HashMap<String, Vec<u32>> = HashMap::new();
        let mut texts: HashMap<String, String> = HashMap::new();
        while engine.has_unfinished_requests() {
            for o in engine.step().unwrap() {
                if o.is_finished() {
                    let text = engine.decode(&o.output_token_ids).unwrap_or_default();
                    texts.insert(o.request_id.to_string(), text);
                    outs.insert(o.request_id.to_string(), o.output_token_ids);
                }
            }
        }
        (outs, texts)
    };
    let (unconstrained, _) = run(false);
    let (outs, texts) = run(true);
    assert_eq!(
        outs["free"], unconstrained["free"],
        "a free request is unchanged beside constrained ones"
    );
    for seed in 0..4 {
        let t = &texts[&format!("choice-{seed}")];
        assert!(choices.contains(&t.trim()), "{t:?} is not one of {choices:?}");
    }
    assert!(
        outs["allowed"].iter().all(|t| [40, 41, 42].contains(t)),
        "{:?}",
        outs["allowed"]
    );
}
