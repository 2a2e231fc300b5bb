//! The CUDA backend against the golden fixtures (transformers + PEFT, f32) and against itself
//! (graphs vs eager), with weights, activations and KV cache in bf16 and again in f16. 16-bit
//! weights make logits differ by rounding, so tokens are compared for the first steps and logits
//! within a tolerance of the element type. Tokens are sampled on the device: greedy
//! ids are checked against the host argmax of the device's logits, and the sampling kernel
//! alone against host-computed top-k/top-p sets and softmax frequencies. Skipped, with a note,
//! where no CUDA driver is found (CI).

mod common;

use std::collections::HashMap;

use common::{add_requests, case_dir, load, lora_requests, max_abs, max_diff, Golden, GoldenRequest};
use multilora_engine::backend::{RowSampling, SamplingBatch};
use multilora_engine::cuda::elem::Elem;
use multilora_engine::cuda::gpu::{DevBuf, Gpu};
use multilora_engine::cuda::sampling::DeviceSampler;
use multilora_engine::cuda::sgmv::{self, GroupWeights, Segments};
use multilora_engine::lora::LoraSlot;
use multilora_engine::sampling::argmax;
use multilora_engine::{Device, EngineConfig, LLMEngine, LoraRequest, Prompt, SamplingParams};
use rand::{Rng, SeedableRng};

/// An engine on the GPU over a golden case's model, without LoRA.
fn cuda_engine(case: &str, max_num_seqs: usize) -> LLMEngine {
    let mut cfg = EngineConfig::new(case_dir(case).join("model"));
    cfg.device = Device::Cuda;
    cfg.max_model_len = Some(256);
    cfg.max_num_seqs = max_num_seqs;
    LLMEngine::new(cfg).expect("engine loads")
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

struct Run {
    tokens: Vec<Vec<u32>>,
    first_logits: Vec<Vec<f32>>,
    /// logits of output token [`DECODE_CHECK_TOKEN`], drawn in a decode step (fused LoRA kernels)
    decode_logits: Vec<Vec<f32>>,
}

/// The output token whose decode-step logits are checked against the CPU backend.
const DECODE_CHECK_TOKEN: usize = 6;

/// Logits of the next token after `prompt` + `prefix`, computed by the CPU backend (f32, the
/// oracle) in one prefill: a teacher-forced reference for a GPU decode step.
fn cpu_next_logits(case: &str, prompt: &[u32], prefix: &[u32], lora: Option<&LoraRequest>) -> Vec<f32> {
    let mut cfg = EngineConfig::new(case_dir(case).join("model"));
    cfg.enable_lora = true;
    cfg.max_loras = 4;
    cfg.max_lora_rank = 16;
    cfg.max_model_len = Some(256);
    let mut engine = LLMEngine::new(cfg).expect("CPU engine loads");
    let ids: Vec<u32> = prompt.iter().chain(prefix).copied().collect();
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(1)
    };
    engine
        .add_request("r", Prompt::TokenIds(ids), params, lora)
        .unwrap();
    engine.step().unwrap();
    engine.last_logits("r").expect("CPU keeps logits").to_vec()
}

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
    let mut cfg = EngineConfig::new(case_dir(case).join("model"));
    cfg.device = Device::Cuda;
    cfg.dtype = elem.name().into();
    cfg.enforce_eager = enforce_eager;
    cfg.return_logits = return_logits;
    cfg.enable_lora = true;
    cfg.max_loras = 4;
    cfg.max_lora_rank = 16;
    cfg.max_model_len = Some(256);
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

/// Largest relative difference of logits from the f32 reference, for an element type. Tiny
/// random models have small, near-tied logits: bf16 weight rounding alone moves them by a few
/// percent of the largest; f16 keeps 3 more mantissa bits.
fn logits_tolerance(elem: Elem) -> f32 {
    match elem {
        Elem::Bf16 => 6e-2,
        Elem::F16 => 2e-2,
    }
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

/// The skinny GEMM (tensor cores, fused epilogues) against cuBLAS on the same inputs, for
/// token counts on both sides of each n-tile, row counts that are not a multiple of 16 and K
/// that is not a multiple of the 64-wide chunk, in bf16 and f16.
#[test]
fn cuda_skinny_gemm_matches_cublas() {
    if !have_gpu() {
        return;
    }
    for elem in Elem::ALL {
        skinny_vs_cublas(elem);
    }
}

fn skinny_vs_cublas(elem: Elem) {
    use multilora_engine::cuda::model::linear;
    use multilora_engine::cuda::skinny::{Epilogue, NormIo, SKINNY_MAX_M};
    let gpu = Gpu::new(0, elem).expect("CUDA context");
    let fill = |ptr: u64, n: usize, seed: u64| fill_uniform(&gpu, ptr, n, seed);
    for &(n, k) in &[
        (1000usize, 4104usize),
        (4096, 4096),
        (512, 11008),
        (48, 64),
        (320, 160),
    ] {
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
                        NormIo::NONE,
                    )
                    .unwrap();
                    let got = if epi == Epilogue::SiluMul {
                        let mut h = vec![0u16; m * ldy];
                        gpu.dtoh(&mut h, y.ptr).unwrap();
                        h.iter().map(|&v| elem.decode(v)).collect()
                    } else {
                        let mut h = vec![0f32; m * ldy];
                        gpu.dtoh(&mut h, y.ptr).unwrap();
                        h
                    };
                    out.push(got);
                }
                let scale = max_abs(&out[0]).max(1e-3);
                let diff = max_diff(&out[0], &out[1]);
                // SiluMul rounds its output to the element type (either side of a rounding edge).
                let tol = match (epi, elem) {
                    (Epilogue::SiluMul, Elem::Bf16) => 1e-2,
                    (Epilogue::SiluMul, Elem::F16) => 2e-3,
                    _ => 1e-4,
                };
                assert!(
                    diff <= tol * scale,
                    "skinny GEMM vs cuBLAS ({}), {epi:?}, M={m}, N={n}, K={k}: max diff {diff} against max |y| {scale}",
                    elem.name()
                );
            }
        }
    }
}

/// The q/k/v GEMM with RoPE and the K/V cache write as its epilogue against the two launches it
/// replaces (skinny Store, then rope_kv_write), for two head sizes, with and without a bias, and
/// 1..13 tokens at scattered positions and cache slots.
#[test]
fn cuda_skinny_rope_matches_gemm_then_rope() {
    if !have_gpu() {
        return;
    }
    use multilora_engine::cuda::gpu::{cfg, Gpu, KernelArg};
    use multilora_engine::cuda::model::linear;
    use multilora_engine::cuda::skinny::{self, Epilogue, NormIo, SKINNY_MAX_M, SKINNY_THREADS};
    // 128-wide heads with a bias (8 blocks a head, partners 64 rows apart), 64-wide without.
    for (hd, with_bias) in [(128usize, true), (64, false)] {
        let (nh, nkv, k, max_pos, num_slots) = (4usize, 2usize, 512usize, 64usize, 64usize);
        let (n, half, kvs) = ((nh + 2 * nkv) * hd, hd / 2, nkv * hd);
        for elem in Elem::ALL {
            let gpu = Gpu::new(0, elem).expect("CUDA context");
            let fill = |ptr: u64, len: usize, seed: u64| fill_uniform(&gpu, ptr, len, seed);
            let (w, x, bias) = (
                gpu.alloc(n * k * 2).unwrap(),
                gpu.alloc(SKINNY_MAX_M * k * 2).unwrap(),
                gpu.alloc(n * 2).unwrap(),
            );
            fill(w.ptr, n * k, 11);
            fill(x.ptr, SKINNY_MAX_M * k, 12);
            fill(bias.ptr, n, 13);
            let angles: Vec<f32> = (0..max_pos * half)
                .map(|i| (i / half) as f32 * 10000f32.powf(-((i % half) as f32) / half as f32))
                .collect();
            let cos = upload(&gpu, &angles.iter().map(|a| a.cos()).collect::<Vec<_>>());
            let sin = upload(&gpu, &angles.iter().map(|a| a.sin()).collect::<Vec<_>>());
            for m in [1usize, 5, 8, 13] {
                let positions: Vec<u32> = (0..m as u32).map(|i| (i * 37 + 5) % max_pos as u32).collect();
                let slots: Vec<u32> = (0..m as u32).map(|i| (i * 7 + 3) % num_slots as u32).collect();
                let (pos_d, slot_d) = (upload(&gpu, &positions), upload(&gpu, &slots));
                // (q rows of y, k cache, v cache) of each path
                let mut got = Vec::new();
                for fused in [false, true] {
                    let y = gpu.alloc(m * n * 4).unwrap();
                    let (kc, vc) = (
                        gpu.alloc(num_slots * kvs * 2).unwrap(),
                        gpu.alloc(num_slots * kvs * 2).unwrap(),
                    );
                    let rope = [cos.ptr, sin.ptr, pos_d.ptr, slot_d.ptr, kc.ptr, vc.ptr];
                    let heads = [(nh as i32).bits(), (nkv as i32).bits(), (hd as i32).bits()];
                    if fused {
                        let mut args = vec![
                            x.ptr,
                            w.ptr,
                            if with_bias { bias.ptr } else { 0 },
                            y.ptr,
                            (m as i32).bits(),
                            (n as i32).bits(),
                            (k as i32).bits(),
                            (n as i32).bits(),
                        ];
                        args.extend(NormIo::NONE.args());
                        args.extend(rope);
                        args.extend(heads);
                        let grid = cfg(((n / 16) as u32, 1, 1), SKINNY_THREADS);
                        // SAFETY: skinny_rope's signature (skinny.rs); buffers sized above.
                        unsafe { gpu.launch(skinny::rope_kernel_name(m), grid, &args) }.unwrap();
                    } else {
                        let (x_, w_, b_) = (x.ptr, w.ptr, with_bias.then_some(bias.ptr));
                        linear(
                            &gpu,
                            SKINNY_MAX_M,
                            Epilogue::Store,
                            w_,
                            b_,
                            n,
                            k,
                            x_,
                            y.ptr,
                            m,
                            n,
                            0,
                            NormIo::NONE,
                        )
                        .unwrap();
                        let mut args = vec![y.ptr, (n as i32).bits(), heads[0], heads[1], heads[2]];
                        args.extend(rope);
                        // No LoRA: lora_tmp, B, ranks, tok_slot null; T, R, L.
                        args.extend([0, 0, 0, 0, (m as i32).bits(), 0, 0]);
                        let grid = cfg(
                            (m as u32, (nh + 2 * nkv) as u32, 1),
                            (half as u32).div_ceil(32) * 32,
                        );
                        // SAFETY: rope_kv_write's signature (kernels.rs); buffers sized above.
                        unsafe { gpu.launch("rope_kv_write", grid, &args) }.unwrap();
                    }
                    let mut yh = vec![0f32; m * n];
                    gpu.dtoh(&mut yh, y.ptr).unwrap();
                    let q: Vec<f32> = yh.chunks(n).flat_map(|r| r[..nh * hd].to_vec()).collect();
                    let cache = |buf: u64| {
                        let mut h = vec![0u16; num_slots * kvs];
                        gpu.dtoh(&mut h, buf).unwrap();
                        slots
                            .iter()
                            .flat_map(|&sl| h[sl as usize * kvs..][..kvs].to_vec())
                            .map(|v| elem.decode(v))
                            .collect::<Vec<f32>>()
                    };
                    got.push((q, cache(kc.ptr), cache(vc.ptr)));
                }
                let (a, b) = (&got[0], &got[1]);
                let tol = if elem == Elem::Bf16 { 1e-2 } else { 2e-3 };
                for (what, x, y, tol) in [
                    ("q", &a.0, &b.0, 1e-4),
                    ("k cache", &a.1, &b.1, tol),
                    ("v cache", &a.2, &b.2, tol),
                ] {
                    let diff = max_diff(x, y);
                    assert!(
                    max_abs(x) > 0.0 && diff <= tol * max_abs(x),
                    "RoPE epilogue vs Store + rope_kv_write ({}), head_dim {hd}, bias {with_bias}, {m} tokens, {what}: max diff {diff} against max {}",
                    elem.name(),
                    max_abs(x)
                );
                }
            }
        }
    }
}

/// An RMSNorm split across two skinny GEMMs (decode steps without LoRA): the residual add
/// writes h · gamma and each token's sum of squares, and the next GEMM (Store, SiLU·mul) scales
/// its dot products by 1/rms; against the same add, `add_rms_norm`, then the plain GEMM. The
/// adds with a norm output run in 16-warp blocks where the plain ones cut K into 2 or 4 shares;
/// 1..8 tokens, row counts that are and are not multiples of 16.
#[test]
fn cuda_split_norm_matches_rms_norm() {
    if !have_gpu() {
        return;
    }
    use multilora_engine::cuda::gpu::{cfg, KernelArg};
    use multilora_engine::cuda::model::linear;
    use multilora_engine::cuda::skinny::{Epilogue, NormIo};
    let eps = 1e-5f32;
    for elem in Elem::ALL {
        let gpu = Gpu::new(0, elem).expect("CUDA context");
        let fill = |ptr: u64, len: usize, seed: u64| fill_uniform(&gpu, ptr, len, seed);
        // (hidden, the add's K): K of 512 / 4096 / 11008 takes 1 / 2 / 4 shares at H = 4096.
        for (h, k) in [(4096usize, 512usize), (4096, 4096), (4096, 11008), (1000, 4104)] {
            let n2 = 768;
            let (w, x, gamma, w2) = (
                gpu.alloc(h * k * 2).unwrap(),
                gpu.alloc(8 * k * 2).unwrap(),
                gpu.alloc(h * 2).unwrap(),
                gpu.alloc(n2 * h * 2).unwrap(),
            );
            fill(w.ptr, h * k, 21);
            fill(x.ptr, 8 * k, 22);
            fill(gamma.ptr, h, 23);
            fill(w2.ptr, n2 * h, 24);
            let mut rng = rand::rngs::StdRng::seed_from_u64(25);
            let h0: Vec<f32> = (0..8 * h).map(|_| rng.random_range(-4.0..4.0)).collect();
            for m in [1usize, 3, 8] {
                for epi in [Epilogue::Store, Epilogue::SiluMul] {
                    let ldz = if epi == Epilogue::SiluMul { n2 / 2 } else { n2 };
                    // (h after the add, z of the next GEMM, sums of squares) of each path
                    let mut got = Vec::new();
                    for split in [false, true] {
                        let y = upload(&gpu, &h0);
                        let xn = gpu.alloc(8 * h * 2).unwrap();
                        let ss = upload(&gpu, &[0f32; 8]);
                        let z = gpu.alloc(8 * n2 * 4).unwrap();
                        let add = |norm| {
                            linear(
                                &gpu,
                                8,
                                Epilogue::Add,
                                w.ptr,
                                None,
                                h,
                                k,
                                x.ptr,
                                y.ptr,
                                m,
                                h,
                                0,
                                norm,
                            )
                            .unwrap()
                        };
                        let next = |norm| {
                            linear(&gpu, 8, epi, w2.ptr, None, n2, h, xn.ptr, z.ptr, m, ldz, 0, norm).unwrap()
                        };
                        if split {
                            add(NormIo {
                                gamma: gamma.ptr,
                                out: xn.ptr,
                                out_ss: ss.ptr,
                                ..NormIo::NONE
                            });
                            next(NormIo {
                                in_ss: ss.ptr,
                                eps,
                                ..NormIo::NONE
                            });
                        } else {
                            add(NormIo::NONE);
                            // add_rms_norm (hidden, rows, w, out, H, eps), no LoRA expand.
                            let args = [
                                y.ptr,
                                0,
                                gamma.ptr,
                                xn.ptr,
                                (h as i32).bits(),
                                eps.bits(),
                                0,
                                0,
                                0,
                                0,
                                0,
                            ];
                            let threads = (h.div_ceil(32) * 32).min(1024) as u32;
                            // SAFETY: add_rms_norm's signature (kernels.rs); buffers sized above.
                            unsafe { gpu.launch("add_rms_norm", cfg((m as u32, 1, 1), threads), &args) }
                                .unwrap();
                            next(NormIo::NONE);
                        }
                        let zv = if epi == Epilogue::SiluMul {
                            let mut v = vec![0u16; m * ldz];
                            gpu.dtoh(&mut v, z.ptr).unwrap();
                            v.iter().map(|&e| elem.decode(e)).collect()
                        } else {
                            download(&gpu, &z, m * ldz)
                        };
                        got.push((download(&gpu, &y, m * h), zv, download(&gpu, &ss, m)));
                    }
                    let (a, b) = (&got[0], &got[1]);
                    let what = format!("{} H={h} K={k} M={m} {epi:?}", elem.name());
                    // The same add, its K cut into shares or over 16 warps of a block: only the
                    // order of the sums differs.
                    let dh = max_diff(&a.0, &b.0);
                    assert!(
                        dh <= 1e-5 * max_abs(&a.0),
                        "{what}: residual stream differs by {dh} with the split norm"
                    );
                    for (i, row) in b.0.chunks(h).enumerate() {
                        let want: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
                        let rel = ((b.2[i] as f64 - want) / want).abs();
                        assert!(
                            rel < 1e-4,
                            "{what}: token {i} sum of squares {} vs {want}",
                            b.2[i]
                        );
                    }
                    // x rounded to 16 bits before or after the 1/rms scale.
                    let tol = if elem == Elem::Bf16 { 2e-2 } else { 4e-3 };
                    let diff = max_diff(&a.1, &b.1);
                    assert!(
                        max_abs(&a.1) > 0.0 && diff <= tol * max_abs(&a.1),
                        "{what}: next GEMM after the split norm vs add_rms_norm: max diff {diff} against max {}",
                        max_abs(&a.1)
                    );
                }
            }
        }
    }
}

/// Both decode attention kernels (128 threads, and the 1024-thread one for few sequences)
/// against attention computed here from the same paged cache: four sequences with contexts from
/// one key to 700 (one part, several, a part of one key), GQA, scattered cache blocks, and as
/// many parts as the model would launch at batch 1 and at batch 32.
#[test]
fn cuda_decode_attention_matches_reference() {
    if !have_gpu() {
        return;
    }
    use multilora_engine::cuda::gpu::{cfg, Gpu, KernelArg};
    use multilora_engine::cuda::kernels::{
        DECODE_ATT_MAX_PARTS, DECODE_ATT_THREADS, DECODE_ATT_WIDE_THREADS,
    };
    let (nh, nkv, hd, bs, max_blocks) = (8usize, 2usize, 128usize, 16usize, 64usize);
    let ctxs = [1usize, 33, 144, 700];
    let (s, kvs, ld) = (ctxs.len(), nkv * hd, (nh + 2 * nkv) * hd);
    let slots = s * max_blocks * bs;
    // Sequence i's logical block b sits at physical block i * max_blocks + (7b + i) % max_blocks.
    let tables: Vec<u32> = (0..s * max_blocks)
        .map(|j| {
            ((j / max_blocks) * max_blocks + (7 * (j % max_blocks) + j / max_blocks) % max_blocks) as u32
        })
        .collect();
    let positions: Vec<u32> = ctxs.iter().map(|&c| c as u32 - 1).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let qkv: Vec<f32> = (0..s * ld).map(|_| rng.random_range(-1.0..1.0)).collect();
    for elem in Elem::ALL {
        let gpu = Gpu::new(0, elem).expect("CUDA context");
        let (kc, vc) = (
            gpu.alloc(slots * kvs * 2).unwrap(),
            gpu.alloc(slots * kvs * 2).unwrap(),
        );
        fill_uniform(&gpu, kc.ptr, slots * kvs, 21);
        fill_uniform(&gpu, vc.ptr, slots * kvs, 22);
        let (mut kh, mut vh) = (vec![0u16; slots * kvs], vec![0u16; slots * kvs]);
        gpu.dtoh(&mut kh, kc.ptr).unwrap();
        gpu.dtoh(&mut vh, vc.ptr).unwrap();
        let scale = 1.0 / (hd as f32).sqrt();
        let mut want = vec![0f32; s * nh * hd];
        for (i, &ctx) in ctxs.iter().enumerate() {
            for h in 0..nh {
                let (q, kvh) = (&qkv[i * ld + h * hd..][..hd], h / (nh / nkv));
                let at = |pos: usize| {
                    (tables[i * max_blocks + pos / bs] as usize * bs + pos % bs) * kvs + kvh * hd
                };
                let scores: Vec<f32> = (0..ctx)
                    .map(|p| (0..hd).map(|d| q[d] * elem.decode(kh[at(p) + d])).sum::<f32>() * scale)
                    .collect();
                let mx = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|x| (x - mx).exp()).collect();
                let sum: f32 = e.iter().sum();
                for d in 0..hd {
                    let v: f32 = (0..ctx).map(|p| e[p] * elem.decode(vh[at(p) + d])).sum();
                    want[(i * nh + h) * hd + d] = v / sum;
                }
            }
        }
        let (q_d, pos_d, tab_d) = (
            upload(&gpu, &qkv),
            upload(&gpu, &positions),
            upload(&gpu, &tables),
        );
        let part = gpu.alloc(s * nh * DECODE_ATT_MAX_PARTS * (hd + 2) * 4).unwrap();
        let counters = gpu.alloc(s * nh * 4).unwrap();
        for (name, threads) in [
            ("decode_attention", DECODE_ATT_THREADS),
            ("decode_attention_wide", DECODE_ATT_WIDE_THREADS),
        ] {
            for parts in [17u32, 1, 3] {
                let out = gpu.alloc(s * nh * hd * 2).unwrap();
                let args = [
                    q_d.ptr,
                    (ld as i32).bits(),
                    out.ptr,
                    kc.ptr,
                    vc.ptr,
                    pos_d.ptr,
                    tab_d.ptr,
                    (max_blocks as i32).bits(),
                    (bs as i32).bits(),
                    (nh as i32).bits(),
                    (nkv as i32).bits(),
                    (hd as i32).bits(),
                    scale.bits(),
                    part.ptr,
                    counters.ptr,
                ];
                let grid = cfg((s as u32, nh as u32, parts), threads);
                // SAFETY: the decode attention kernels' signature (kernels.rs); buffers sized above.
                unsafe { gpu.launch(name, grid, &args) }.unwrap();
                let mut got = vec![0u16; s * nh * hd];
                gpu.dtoh(&mut got, out.ptr).unwrap();
                let got: Vec<f32> = got.iter().map(|&v| elem.decode(v)).collect();
                let diff = max_diff(&want, &got);
                assert!(
                    diff <= 1e-2 * max_abs(&want),
                    "{name} ({}), {parts} parts: max diff {diff} from the reference (max |out| {})",
                    elem.name(),
                    max_abs(&want)
                );
            }
        }
    }
}

/// One attention case: heads, KV heads, head size, and per sequence (cached context before the
/// step, query tokens of the step).
struct AttCase {
    nh: usize,
    nkv: usize,
    hd: usize,
    seqs: Vec<(usize, usize)>,
    /// Also compare with attention computed here (f64 sums); else only with `paged_attention`.
    host_ref: bool,
}

/// The tensor-core prefill attention against `paged_attention` (f32 scalar, the kernel it
/// replaces) and, on the smaller cases, against attention computed here, on the same paged
/// cache: prompts from position 0 and chunks whose earlier context is already cached, a
/// decode-like one-token query in a mixed step, GQA groups 1, 4, 7 and 8, head sizes 128, 64
/// and 80 (padded), 16-token blocks scattered, a 2,100-token prompt and a 32k-token one. The
/// output is poisoned with NaN first, so a row the kernel skips fails.
#[test]
fn cuda_prefill_attention_matches_reference() {
    if !have_gpu() {
        return;
    }
    let cases = [
        AttCase {
            nh: 8,
            nkv: 8,
            hd: 128,
            seqs: vec![(0, 300), (500, 77), (40, 1)],
            host_ref: true,
        },
        AttCase {
            nh: 8,
            nkv: 2,
            hd: 128,
            seqs: vec![(0, 2100)],
            host_ref: true,
        },
        AttCase {
            nh: 14,
            nkv: 2,
            hd: 64,
            seqs: vec![(0, 100), (130, 50), (7, 9)],
            host_ref: true,
        },
        AttCase {
            nh: 8,
            nkv: 1,
            hd: 80,
            seqs: vec![(0, 200), (64, 33)],
            host_ref: true,
        },
        AttCase {
            nh: 4,
            nkv: 4,
            hd: 16,
            seqs: vec![(0, 70), (5, 3)],
            host_ref: true,
        },
        AttCase {
            nh: 4,
            nkv: 1,
            hd: 128,
            seqs: vec![(0, 32768)],
            host_ref: false,
        },
    ];
    use multilora_engine::cuda::prefill;
    for elem in Elem::ALL {
        let gpu = Gpu::new(0, elem).expect("CUDA context");
        for (ci, c) in cases.iter().enumerate() {
            let k = prefill::kernel(c.hd, c.nh / c.nkv).expect("a prefill attention kernel");
            check_prefill_attention(&gpu, c, k, ci as u64);
        }
    }
}

fn check_prefill_attention(gpu: &Gpu, c: &AttCase, k: multilora_engine::cuda::prefill::Kernel, seed: u64) {
    use multilora_engine::cuda::gpu::{cfg, KernelArg};
    use multilora_engine::cuda::kernels::ATT_THREADS;
    use multilora_engine::cuda::prefill;
    let (nh, nkv, hd, bs) = (c.nh, c.nkv, c.hd, 16usize);
    let (kvs, ld) = (nkv * hd, (nh + 2 * nkv) * hd);
    let max_ctx = c.seqs.iter().map(|&(p, q)| p + q).max().unwrap();
    let max_blocks = max_ctx.div_ceil(bs);
    let s = c.seqs.len();
    // Sequence i's logical block b sits at physical block i * max_blocks + (7b + i) % max_blocks.
    let tables: Vec<u32> = (0..s * max_blocks)
        .map(|j| {
            ((j / max_blocks) * max_blocks + (7 * (j % max_blocks) + j / max_blocks) % max_blocks) as u32
        })
        .collect();
    let slots = s * max_blocks * bs;
    let (mut query_start, mut positions, mut token_seq) = (vec![0u32], Vec::new(), Vec::new());
    for (i, &(past, q)) in c.seqs.iter().enumerate() {
        positions.extend((past..past + q).map(|p| p as u32));
        token_seq.extend(std::iter::repeat_n(i as u32, q));
        query_start.push(positions.len() as u32);
    }
    let t = positions.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let qkv: Vec<f32> = (0..t * ld).map(|_| rng.random_range(-2.0..2.0)).collect();
    let (kc, vc) = (
        gpu.alloc(slots * kvs * 2).unwrap(),
        gpu.alloc(slots * kvs * 2).unwrap(),
    );
    fill_uniform(gpu, kc.ptr, slots * kvs, 31 + seed);
    fill_uniform(gpu, vc.ptr, slots * kvs, 41 + seed);
    let group = nh / nkv;
    let mut tiles = vec![0u32; 2 * t];
    let num_tiles = prefill::pack_tiles(&query_start, k.tokens_per_tile(group), &mut tiles);
    let (q_d, pos_d, seq_d, tab_d, tiles_d) = (
        upload(gpu, &qkv),
        upload(gpu, &positions),
        upload(gpu, &token_seq),
        upload(gpu, &tables),
        upload(gpu, &tiles[..2 * num_tiles]),
    );
    let what = format!(
        "{} ({}), nh {nh}, nkv {nkv}, hd {hd}, seqs {:?}",
        k.name,
        gpu.elem.name(),
        c.seqs
    );
    let read = |buf: &DevBuf| {
        let mut v = vec![0u16; t * nh * hd];
        gpu.dtoh(&mut v, buf.ptr).unwrap();
        v.iter().map(|&x| gpu.elem.decode(x)).collect::<Vec<f32>>()
    };
    let poisoned = || {
        let out = gpu.alloc(t * nh * hd * 2).unwrap();
        let args = [out.ptr, (t * nh * hd) as u64, f32::NAN.bits()];
        // SAFETY: fill(out, n, v) (kernels.rs) over the n elements just allocated.
        unsafe { gpu.launch("fill", cfg((256, 1, 1), 256), &args) }.unwrap();
        out
    };
    let fa = poisoned();
    let inputs = prefill::Inputs {
        qkv: q_d.ptr,
        ld,
        out: fa.ptr,
        k_cache: kc.ptr,
        v_cache: vc.ptr,
        tiles: tiles_d.ptr,
        num_tiles,
        token_seq: seq_d.ptr,
        positions: pos_d.ptr,
        block_tables: tab_d.ptr,
        max_blocks,
        block_size: bs,
    };
    prefill::launch(gpu, k, &inputs, nh, nkv, hd).unwrap();
    let got = read(&fa);
    let old = poisoned();
    let args = [
        q_d.ptr,
        (ld as i32).bits(),
        old.ptr,
        kc.ptr,
        vc.ptr,
        seq_d.ptr,
        pos_d.ptr,
        tab_d.ptr,
        (max_blocks as i32).bits(),
        (bs as i32).bits(),
        (nh as i32).bits(),
        (nkv as i32).bits(),
        (hd as i32).bits(),
        (1.0f32 / (hd as f32).sqrt()).bits(),
    ];
    // SAFETY: paged_attention's signature (kernels.rs); buffers sized above.
    unsafe {
        gpu.launch(
            "paged_attention",
            cfg((t as u32, nh as u32, 1), ATT_THREADS),
            &args,
        )
    }
    .unwrap();
    let want = read(&old);
    assert!(
        want.iter().all(|v| v.is_finite()),
        "{what}: paged_attention left rows unwritten"
    );
    check_close(&got, &want, &format!("{what} vs paged_attention"));
    if c.host_ref {
        let (mut kh, mut vh) = (vec![0u16; slots * kvs], vec![0u16; slots * kvs]);
        gpu.dtoh(&mut kh, kc.ptr).unwrap();
        gpu.dtoh(&mut vh, vc.ptr).unwrap();
        let dec = |v: &[u16]| v.iter().map(|&x| gpu.elem.decode(x) as f64).collect::<Vec<f64>>();
        let (kh, vh) = (dec(&kh), dec(&vh));
        let scale = 1.0 / (hd as f64).sqrt();
        let mut host = vec![0f32; t * nh * hd];
        for i in 0..t {
            let (seq, ctx) = (token_seq[i] as usize, positions[i] as usize + 1);
            for h in 0..nh {
                let (q, kvh) = (&qkv[i * ld + h * hd..][..hd], h / group);
                let at =
                    |p: usize| (tables[seq * max_blocks + p / bs] as usize * bs + p % bs) * kvs + kvh * hd;
                let scores: Vec<f64> = (0..ctx)
                    .map(|p| (0..hd).map(|d| q[d] as f64 * kh[at(p) + d]).sum::<f64>() * scale)
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let v: f64 = (0..ctx).map(|p| e[p] * vh[at(p) + d]).sum();
                    host[(i * nh + h) * hd + d] = (v / sum) as f32;
                }
            }
        }
        check_close(&got, &host, &format!("{what} vs the host"));
    }
}

/// `got` within 16-bit rounding of `want`: relative L2 error ≤ 1e-2, every element within 5% of
/// the largest, and no NaN (an unwritten, poisoned element).
fn check_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let unwritten = got.iter().filter(|v| !v.is_finite()).count();
    assert_eq!(
        unwritten, 0,
        "{what}: {unwritten} outputs not written (or not finite)"
    );
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += ((g - w) as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    let rel = (num / den).sqrt();
    let (diff, top) = (max_diff(got, want), max_abs(want));
    assert!(
        rel <= 1e-2 && diff <= 5e-2 * top,
        "{what}: relative L2 error {rel:.2e}, max diff {diff} (max |want| {top})"
    );
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

// ---- SGMV (segmented LoRA, prefill) against a host reference and against BGMV ----

/// One layout of tokens, adapters and shapes for the LoRA kernels.
struct LoraCase {
    name: &'static str,
    /// out features of each projection of the group (1 to 3), concatenated along N
    outs: Vec<usize>,
    k: usize,
    /// device rank (a multiple of 8)
    r: usize,
    /// `[nsub][max_loras]` rank of each slot's adapter for each projection (0: not targeted)
    ranks: Vec<Vec<usize>>,
    /// `[T]` each token's slot
    lora: Vec<Option<u32>>,
}

/// `n` 16-bit values at `ptr` drawn uniformly from [-1, 1) by the device (seeded).
fn fill_uniform(gpu: &Gpu, ptr: u64, n: usize, seed: u64) {
    use multilora_engine::cuda::gpu::{cfg, KernelArg};
    let args = [ptr, n as u64, seed, 1.0f32.bits()];
    // SAFETY: callers pass a buffer of n 16-bit values (fill_uniform's signature in kernels.rs).
    unsafe { gpu.launch("fill_uniform", cfg((256, 1, 1), 256), &args) }.unwrap();
}

fn upload<T>(gpu: &Gpu, v: &[T]) -> DevBuf {
    let buf = gpu.alloc(std::mem::size_of_val(v)).unwrap();
    gpu.htod(buf.ptr, v).unwrap();
    buf
}

fn download(gpu: &Gpu, buf: &DevBuf, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    gpu.dtoh(&mut v, buf.ptr).unwrap();
    v
}

/// Host data of a case: x, A, B representable in the element type (zero past each rank, as
/// `LoraGroup::set` writes them), scales, an initial y, and the reference tmp and y (f64 sums).
struct LoraData {
    elem: Elem,
    nsub: usize,
    max_loras: usize,
    t: usize,
    n: usize,
    ldy: usize,
    n1: usize,
    n2: usize,
    x: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    ranks: Vec<i32>,
    scales: Vec<f32>,
    y0: Vec<f32>,
    tmp_ref: Vec<f32>,
    y_ref: Vec<f32>,
}

/// `with_ref`: compute the reference (skipped for timing).
fn lora_data(c: &LoraCase, seed: u64, with_ref: bool, elem: Elem) -> LoraData {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (nsub, max_loras, t, k, r) = (c.outs.len(), c.ranks[0].len(), c.lora.len(), c.k, c.r);
    let n: usize = c.outs.iter().sum();
    let ldy = n + 3;
    let n1 = if nsub > 1 { c.outs[0] } else { n };
    let n2 = if nsub > 2 { c.outs[0] + c.outs[1] } else { n };
    let sub_of = |o: usize| {
        if o < n1 {
            0
        } else if o < n2 {
            1
        } else {
            2
        }
    };
    let mut uni = |lim: f32, len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| elem.round(rng.random_range(-lim..lim)))
            .collect()
    };
    let x = uni(1.0, t * k);
    let mut a = uni(1.0 / (k as f32).sqrt(), nsub * max_loras * r * k);
    let mut b = uni(1.0, max_loras * n * r);
    let y0 = uni(1.0, t * ldy);
    let scales: Vec<f32> = (0..nsub * max_loras)
        .map(|i| 0.5 + 0.25 * (i % 5) as f32)
        .collect();
    let ranks: Vec<i32> = (0..nsub)
        .flat_map(|z| c.ranks[z].iter().map(|&rk| rk as i32))
        .collect();
    for z in 0..nsub {
        for s in 0..max_loras {
            let rk = c.ranks[z][s];
            assert!(rk <= r);
            a[((z * max_loras + s) * r + rk) * k..((z * max_loras + s) * r + r) * k].fill(0.0);
        }
    }
    for s in 0..max_loras {
        for o in 0..n {
            let rk = c.ranks[sub_of(o)][s];
            b[(s * n + o) * r + rk..(s * n + o) * r + r].fill(0.0);
        }
    }
    let mut tmp_ref = vec![0f32; nsub * t * r];
    let mut y_ref = y0.clone();
    for (ti, slot) in c.lora.iter().enumerate().filter(|_| with_ref) {
        let Some(s) = slot.map(|s| s as usize) else {
            continue;
        };
        for z in 0..nsub {
            for ri in 0..c.ranks[z][s] {
                let row = &a[((z * max_loras + s) * r + ri) * k..][..k];
                let dot: f64 = (0..k).map(|j| x[ti * k + j] as f64 * row[j] as f64).sum();
                tmp_ref[(z * t + ti) * r + ri] = (dot * scales[z * max_loras + s] as f64) as f32;
            }
        }
        for o in 0..n {
            let z = sub_of(o);
            let d: f64 = (0..c.ranks[z][s])
                .map(|ri| tmp_ref[(z * t + ti) * r + ri] as f64 * b[(s * n + o) * r + ri] as f64)
                .sum();
            y_ref[ti * ldy + o] += d as f32;
        }
    }
    LoraData {
        elem,
        nsub,
        max_loras,
        t,
        n,
        ldy,
        n1,
        n2,
        x,
        a,
        b,
        ranks,
        scales,
        y0,
        tmp_ref,
        y_ref,
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kernel {
    Sgmv,
    /// BGMV as prefill runs it (`lora_shrink_wide`, a warp per rank row)
    Bgmv,
    /// BGMV as decode runs it (`lora_shrink`, SHRINK_ROWS rank rows a block); its expand is
    /// `lora_expand` as for Bgmv
    BgmvDecode,
}

/// A case's buffers on the device.
struct LoraDev {
    _weights: Vec<DevBuf>,
    x: DevBuf,
    y: DevBuf,
    tmp: DevBuf,
    tok_slot: DevBuf,
    w: GroupWeights,
    seg: Segments,
    t: usize,
    ldy: usize,
}

fn upload_lora(gpu: &Gpu, c: &LoraCase, d: &LoraData) -> LoraDev {
    let (t, r) = (d.t, c.r);
    assert_eq!(
        gpu.elem, d.elem,
        "the case's data is encoded for the device's element type"
    );
    let a = upload(gpu, &d.elem.encode_all(&d.a));
    let b = upload(gpu, &d.elem.encode_all(&d.b));
    let ranks = upload(gpu, &d.ranks);
    let scales = upload(gpu, &d.scales);
    let tok_slot: Vec<i32> = c.lora.iter().map(|s| s.map_or(-1, |s| s as i32)).collect();
    let token_lora: Vec<Option<LoraSlot>> = c.lora.iter().map(|s| s.map(LoraSlot)).collect();
    let mut segs = vec![0u32; 3 * t];
    let num_segs = sgmv::pack_lora_segments(&token_lora, &mut segs);
    let seg_buf = upload(gpu, &segs);
    let num_buf = upload(gpu, &[num_segs as u32]);
    let w = GroupWeights {
        a: a.ptr,
        b: b.ptr,
        ranks: ranks.ptr,
        scales: scales.ptr,
        nsub: d.nsub,
        k: c.k,
        n: d.n,
        n1: d.n1,
        n2: d.n2,
        r,
        max_loras: d.max_loras,
    };
    let seg = Segments {
        segs: seg_buf.ptr,
        num_segs: num_buf.ptr,
        // Launched for more than the real count: blocks past it must do nothing.
        max_segs: num_segs + 2,
    };
    LoraDev {
        _weights: vec![a, b, ranks, scales, seg_buf, num_buf],
        x: upload(gpu, &d.elem.encode_all(&d.x)),
        y: upload(gpu, &d.y0),
        // NaN-filled, so a kernel that skips a value it should write shows.
        tmp: upload(gpu, &vec![f32::NAN; d.nsub * t * r]),
        tok_slot: upload(gpu, &tok_slot),
        w,
        seg,
        t,
        ldy: d.ldy,
    }
}

fn launch_shrink(gpu: &Gpu, dev: &LoraDev, kernel: Kernel) {
    let (w, t, slots) = (&dev.w, dev.t, dev.tok_slot.ptr);
    match kernel {
        Kernel::Sgmv => sgmv::shrink(gpu, w, &dev.seg, dev.x.ptr, dev.tmp.ptr, t),
        Kernel::Bgmv => sgmv::bgmv_shrink(gpu, w, slots, dev.x.ptr, dev.tmp.ptr, t, true),
        Kernel::BgmvDecode => sgmv::bgmv_shrink(gpu, w, slots, dev.x.ptr, dev.tmp.ptr, t, false),
    }
    .unwrap()
}

fn launch_expand(gpu: &Gpu, dev: &LoraDev, kernel: Kernel) {
    let (w, t, ldy) = (&dev.w, dev.t, dev.ldy);
    match kernel {
        Kernel::Sgmv => sgmv::expand(gpu, w, &dev.seg, dev.tmp.ptr, dev.y.ptr, t, ldy),
        Kernel::Bgmv | Kernel::BgmvDecode => {
            sgmv::bgmv_expand(gpu, w, dev.tok_slot.ptr, dev.tmp.ptr, dev.y.ptr, t, ldy)
        }
    }
    .unwrap()
}

/// Runs shrink then expand with the given kernels on the device; returns (tmp, y).
fn run_lora(gpu: &Gpu, c: &LoraCase, d: &LoraData, shrink: Kernel, expand: Kernel) -> (Vec<f32>, Vec<f32>) {
    let dev = upload_lora(gpu, c, d);
    launch_shrink(gpu, &dev, shrink);
    launch_expand(gpu, &dev, expand);
    gpu.sync().unwrap_or_else(|e| {
        panic!(
            "{}: {shrink:?} shrink + {expand:?} expand failed on the device: {e}",
            c.name
        )
    });
    (
        download(gpu, &dev.tmp, d.nsub * d.t * c.r),
        download(gpu, &dev.y, d.t * d.ldy),
    )
}

/// Checks tmp (tokens with an adapter; padding ranks must be 0) and y against the reference.
fn check_lora(c: &LoraCase, d: &LoraData, tmp: &[f32], y: &[f32], what: &str) {
    let (t, r) = (d.t, c.r);
    let tmp_scale = max_abs(&d.tmp_ref).max(1e-3);
    for z in 0..d.nsub {
        for ti in 0..t {
            let Some(s) = c.lora[ti] else { continue };
            for ri in 0..r {
                let (got, want) = (tmp[(z * t + ti) * r + ri], d.tmp_ref[(z * t + ti) * r + ri]);
                let tol = 1e-3 * tmp_scale;
                assert!(
                    (got - want).abs() <= tol,
                    "{}: {what}: shrink output tmp[sub {z}, token {ti}, rank {ri}] = {got}, reference {want} \
                     (tolerance {tol:.2e}); token's slot {s}, its rank for this sub {} of device rank {r}",
                    c.name,
                    c.ranks[z][s as usize]
                );
            }
        }
    }
    let delta = max_diff(&d.y_ref, &d.y0);
    let tol = 2e-3 * delta.max(1e-3) + 1e-5;
    for ti in 0..t {
        for o in 0..d.ldy {
            let (got, want) = (y[ti * d.ldy + o], d.y_ref[ti * d.ldy + o]);
            assert!(
                (got - want).abs() <= tol,
                "{}: {what}: y[token {ti}, output {o}] = {got}, reference {want}, before the kernels {} \
                 (tolerance {tol:.2e}); token's slot {:?}; N = {} (subs start at 0, {}, {}), ldy = {}",
                c.name,
                d.y0[ti * d.ldy + o],
                c.lora[ti],
                d.n,
                d.n1,
                d.n2,
                d.ldy
            );
        }
    }
}

fn lora_cases() -> Vec<LoraCase> {
    let mut short = Vec::new();
    // Sequences of 1-3 tokens with varying slots (some without adapter), as a mixed step.
    let slots = [
        Some(0),
        Some(1),
        None,
        Some(3),
        Some(1),
        Some(1),
        None,
        Some(2),
        Some(0),
        Some(3),
    ];
    for (i, s) in slots.iter().cycle().take(23).enumerate() {
        short.extend(std::iter::repeat_n(*s, 1 + i % 3));
    }
    let mut mixed = vec![None; 5];
    mixed.extend(vec![Some(2); 70]);
    mixed.extend(vec![Some(0); 1]);
    mixed.extend(vec![None; 3]);
    mixed.extend(vec![Some(1); 17]);
    let mut big = vec![Some(1); 100];
    big.extend(vec![Some(0); 100]);
    big.extend(vec![None; 28]);
    vec![
        LoraCase {
            name: "one long segment (150 tokens), nsub 3, N=37+19+21, K=136, R=24",
            outs: vec![37, 19, 21],
            k: 136,
            r: 24,
            ranks: vec![vec![24, 24, 5], vec![17, 8, 0], vec![24, 1, 3]],
            lora: vec![Some(1); 150],
        },
        LoraCase {
            name: "many short segments (1-3 tokens), nsub 2, N=64+48, K=64, R=16",
            outs: vec![64, 48],
            k: 64,
            r: 16,
            ranks: vec![vec![16, 8, 3, 0], vec![16, 16, 3, 5]],
            lora: short,
        },
        LoraCase {
            name: "tokens without adapter around segments, nsub 3, N=256+64+64, K=512, R=64",
            outs: vec![256, 64, 64],
            k: 512,
            r: 64,
            ranks: vec![vec![64, 33, 7], vec![64, 33, 7], vec![40, 0, 16]],
            lora: mixed,
        },
        LoraCase {
            name: "Llama-7B o_proj shape, nsub 1, N=4096, K=4096, R=16, ranks 16 and 8",
            outs: vec![4096],
            k: 4096,
            r: 16,
            ranks: vec![vec![16, 8]],
            lora: big,
        },
        LoraCase {
            // Past the rows the decode shrink loads before its PDL wait (K > 256 * 8 * 2).
            name: "a decode step, nsub 2, N=40+24, K=5000, R=32, ranks 32, 17, 5",
            outs: vec![40, 24],
            k: 5000,
            r: 32,
            ranks: vec![vec![32, 17, 5], vec![5, 32, 17]],
            lora: vec![Some(0), Some(2), None, Some(1), Some(1), Some(0)],
        },
    ]
}

/// SGMV shrink and expand agree with the reference loops, and mix with the BGMV kernels (same
/// tmp layout), for one long segment, many short ones, tokens without adapter, ranks below R
/// and not multiples of 8, K past what the decode shrink preloads, and 1-3 projections per
/// group, in bf16 and f16; the decode BGMV shrink against the same reference.
#[test]
fn cuda_sgmv_matches_reference_and_bgmv() {
    if !have_gpu() {
        return;
    }
    for elem in Elem::ALL {
        sgmv_vs_reference_and_bgmv(elem);
    }
}

fn sgmv_vs_reference_and_bgmv(elem: Elem) {
    let gpu = Gpu::new(0, elem).expect("CUDA device");
    for (i, c) in lora_cases().iter().enumerate() {
        let d = lora_data(c, 7 + i as u64, true, elem);
        for (shrink, expand) in [
            (Kernel::Sgmv, Kernel::Sgmv),
            (Kernel::Sgmv, Kernel::Bgmv),
            (Kernel::Bgmv, Kernel::Sgmv),
            (Kernel::Bgmv, Kernel::Bgmv),
            (Kernel::BgmvDecode, Kernel::Bgmv),
        ] {
            let (tmp, y) = run_lora(&gpu, c, &d, shrink, expand);
            let what = format!("{} {shrink:?} shrink + {expand:?} expand", elem.name());
            check_lora(c, &d, &tmp, &y, &what);
            eprintln!("{}: {what}: ok", c.name);
        }
    }
}

/// Not a check: prints the time of SGMV and BGMV shrink and expand on Llama-2-7B's q/k/v and o
/// shapes (rank 16, a distinct adapter per 128-token sequence) from 128 to 4096 tokens, for
/// tuning on the GPU machine (where SGMV overtakes BGMV sets `SGMV_MIN_TOKENS` in model.rs):
/// `cuda_test --ignored --nocapture cuda_sgmv_timing`.
#[test]
#[ignore]
fn cuda_sgmv_timing() {
    if !have_gpu() {
        return;
    }
    let gpu = Gpu::new(0, Elem::Bf16).expect("CUDA device");
    let (start, end) = (gpu.timing_event().unwrap(), gpu.timing_event().unwrap());
    let time = |f: &dyn Fn()| {
        f();
        start.record(&gpu.stream).unwrap();
        for _ in 0..20 {
            f();
        }
        end.record(&gpu.stream).unwrap();
        gpu.sync().unwrap();
        start.elapsed_ms(&end).unwrap() * 1e3 / 20.0
    };
    for num_seqs in [1, 2, 4, 8, 16, 32] {
        for outs in [vec![4096; 3], vec![4096]] {
            let c = LoraCase {
                name: "timing",
                ranks: vec![vec![16; 32]; outs.len()],
                outs,
                k: 4096,
                r: 16,
                lora: (0..num_seqs * 128).map(|i| Some((i / 128) as u32)).collect(),
            };
            let d = lora_data(&c, 1, false, Elem::Bf16);
            let dev = upload_lora(&gpu, &c, &d);
            for k in [Kernel::Sgmv, Kernel::Bgmv] {
                let shrink = time(&|| launch_shrink(&gpu, &dev, k));
                let expand = time(&|| launch_expand(&gpu, &dev, k));
                eprintln!(
                    "T={} nsub={}: {k:?} shrink {shrink:.1} us, expand {expand:.1} us",
                    d.t, d.nsub
                );
            }
        }
    }
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
        let mut cfg = EngineConfig::new(case_dir(case).join("model"));
        cfg.device = device;
        cfg.enable_lora = true;
        cfg.max_loras = 4;
        cfg.max_lora_rank = 16;
        cfg.max_model_len = Some(256);
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
