//! The CUDA backend against the golden fixtures (transformers + PEFT, f32) and against itself
//! (graphs vs eager). bf16 weights make logits differ by rounding, so tokens are compared for
//! the first steps and logits within a bf16 tolerance. Skipped, with a note, where no CUDA
//! driver is found (CI).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use multilora_engine::{AdapterId, Device, EngineConfig, LLMEngine, LoraRequest, Prompt, SamplingParams};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    num_steps: usize,
    requests: Vec<GoldenRequest>,
}

#[derive(Deserialize, Clone)]
struct GoldenRequest {
    prompt_token_ids: Vec<u32>,
    lora: Option<String>,
    greedy_token_ids: Vec<u32>,
    first_logits: Vec<f32>,
}

/// The fixtures: from the build's source tree, or, for a test binary carried to the GPU
/// machine, `crates/engine` under the working directory.
fn case_dir(case: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = if built.exists() {
        built.to_path_buf()
    } else {
        PathBuf::from("crates/engine")
    };
    root.join("tests/golden").join(case)
}

fn have_gpu() -> bool {
    match multilora_engine::cuda::gpu::probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("note: skipping CUDA test: {e}");
            false
        }
    }
}

fn lora_requests(case: &str) -> HashMap<String, LoraRequest> {
    let dir = case_dir(case).join("adapters");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let req = LoraRequest {
                name: n.clone(),
                id: AdapterId(i as u32 + 1),
                path: dir.join(&n),
            };
            (n, req)
        })
        .collect()
}

struct Run {
    tokens: Vec<Vec<u32>>,
    first_logits: Vec<Vec<f32>>,
}

fn run(case: &str, golden: &Golden, device: Device, enforce_eager: bool) -> Run {
    let mut cfg = EngineConfig::new(case_dir(case).join("model"));
    cfg.device = device;
    cfg.enforce_eager = enforce_eager;
    cfg.enable_lora = true;
    cfg.max_loras = 4;
    cfg.max_lora_rank = 16;
    cfg.max_model_len = Some(256);
    cfg.max_num_seqs = 16;
    let mut engine = LLMEngine::new(cfg).expect("engine loads");
    let loras = lora_requests(case);
    let n = golden.num_steps;
    for (i, r) in golden.requests.iter().enumerate() {
        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(n)
        };
        let lora = r.lora.as_ref().map(|name| &loras[name]);
        engine
            .add_request(
                &i.to_string(),
                Prompt::TokenIds(r.prompt_token_ids.clone()),
                params,
                lora,
            )
            .unwrap();
    }
    let k = golden.requests.len();
    let mut out = Run {
        tokens: vec![Vec::new(); k],
        first_logits: vec![Vec::new(); k],
    };
    while engine.has_unfinished_requests() {
        for o in engine.step().unwrap() {
            let i: usize = o.request_id.parse().unwrap();
            if o.num_output_tokens == 1 {
                out.first_logits[i] = engine.last_logits(&o.request_id).unwrap().to_vec();
            }
            if o.is_finished() {
                out.tokens[i] = o.output_token_ids;
            }
        }
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Number of leading tokens two sequences share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn check_case(case: &str) {
    if !have_gpu() {
        return;
    }
    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(case_dir(case).join("golden.json")).unwrap()).unwrap();
    let graphs = run(case, &golden, Device::Cuda, false);
    let eager = run(case, &golden, Device::Cuda, true);
    for (i, r) in golden.requests.iter().enumerate() {
        let rel = max_diff(&graphs.first_logits[i], &r.first_logits) / max_abs(&r.first_logits).max(1e-6);
        let same = common_prefix(&graphs.tokens[i], &r.greedy_token_ids);
        eprintln!(
            "{case} request {i} (adapter {:?}): first-logits max rel diff {rel:.2e}, {same}/{} greedy tokens match PEFT",
            r.lora,
            r.greedy_token_ids.len()
        );
        // Tiny random models have small, near-tied logits: bf16 weight rounding alone moves them
        // by a few percent of the largest, and later greedy tokens may flip on near-ties
        // (scripts/gpu_check_peft.py compares longer runs on a larger model).
        assert!(
            rel < 6e-2,
            "{case} request {i}: first logits differ by {rel} (relative)"
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
        let d = max_diff(&graphs.first_logits[i], &eager.first_logits[i]);
        assert!(
            d <= 1e-5,
            "{case} request {i}: graph vs eager logits differ by {d}"
        );
    }
}

#[test]
fn cuda_llama_mixed_adapters() {
    check_case("llama");
}

#[test]
fn cuda_llama3_tied() {
    check_case("llama3_tied");
}

#[test]
fn cuda_qwen2_bias() {
    check_case("qwen2_bf16_sharded");
}

#[test]
fn cuda_qwen3_qk_norm() {
    check_case("qwen3");
}

#[test]
fn cuda_mistral() {
    check_case("mistral");
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

/// The skinny GEMM (tensor cores, fused epilogues) against cuBLAS on the same bf16 inputs, for
/// token counts on both sides of each n-tile, row counts that are not a multiple of 16 and K
/// that is not a multiple of the 64-wide chunk.
#[test]
fn cuda_skinny_gemm_matches_cublas() {
    use cudarc::driver::PushKernelArg;
    use multilora_engine::cuda::gpu::{cfg, Gpu};
    use multilora_engine::cuda::model::linear;
    use multilora_engine::cuda::skinny::{Epilogue, SKINNY_MAX_M};
    if !have_gpu() {
        return;
    }
    let gpu = Gpu::new(0).expect("CUDA context");
    let fill = |ptr: u64, n: usize, seed: u64| {
        let mut b = gpu.stream.launch_builder(gpu.func("fill_uniform_bf16"));
        let (n64, bound) = (n as u64, 1.0f32);
        b.arg(&ptr).arg(&n64).arg(&seed).arg(&bound);
        // SAFETY: `ptr` holds n bf16 values (fill_uniform_bf16's signature in kernels.rs).
        unsafe { b.launch(cfg((256, 1, 1), 256)) }.unwrap();
    };
    for &(n, k) in &[(1000usize, 4104usize), (4096, 4096), (48, 64), (320, 160)] {
        let w = gpu.alloc(n * k * 2).unwrap();
        let x = gpu.alloc(SKINNY_MAX_M * k * 2).unwrap();
        fill(w.ptr, n * k, 1);
        fill(x.ptr, SKINNY_MAX_M * k, 2);
        let bias = gpu.alloc(n * 2).unwrap();
        fill(bias.ptr, n, 3);
        let scratch = gpu.alloc(SKINNY_MAX_M * n * 4).unwrap();
        let (ya, yb) = (
            gpu.alloc(SKINNY_MAX_M * n * 4).unwrap(),
            gpu.alloc(SKINNY_MAX_M * n * 4).unwrap(),
        );
        for m in [1usize, 3, 8, 9, 16, 17, 32] {
            for epi in [Epilogue::Store, Epilogue::Add, Epilogue::SiluMul] {
                let b = (epi != Epilogue::SiluMul).then_some(bias.ptr);
                let ldy = if epi == Epilogue::SiluMul { n / 2 } else { n };
                let mut out = Vec::new();
                for (y, max_m) in [(&ya, 0), (&yb, SKINNY_MAX_M)] {
                    // Add accumulates onto what is there: start both from the same values.
                    let init = vec![0.25f32; SKINNY_MAX_M * n];
                    gpu.htod(y.ptr, &init).unwrap();
                    linear(
                        &gpu,
                        max_m,
                        epi,
                        w.ptr,
                        b,
                        n,
                        k,
                        x.ptr,
                        y.ptr,
                        m,
                        ldy,
                        scratch.ptr,
                    )
                    .unwrap();
                    let got = if epi == Epilogue::SiluMul {
                        let mut h = vec![0u16; m * ldy];
                        gpu.dtoh(&mut h, y.ptr).unwrap();
                        h.iter().map(|&v| half::bf16::from_bits(v).to_f32()).collect()
                    } else {
                        let mut h = vec![0f32; m * ldy];
                        gpu.dtoh(&mut h, y.ptr).unwrap();
                        h
                    };
                    out.push(got);
                }
                let scale = max_abs(&out[0]).max(1e-3);
                let diff = max_diff(&out[0], &out[1]);
                let tol = if epi == Epilogue::SiluMul { 1e-2 } else { 1e-4 };
                assert!(
                    diff <= tol * scale,
                    "skinny GEMM vs cuBLAS, {epi:?}, M={m}, N={n}, K={k}: max diff {diff} against max |y| {scale}"
                );
            }
        }
    }
}
