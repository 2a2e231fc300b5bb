//! A minimal GPU benchmark of the engine, for `bench/gpu.sh`, until `multilora bench` runs there:
//! a model from `config.json` alone (`load_format: dummy`, bf16 or f16 on the device), N synthesized
//! PEFT adapters, batch sizes 1..32, fixed prompt and output lengths, the no-LoRA series and the
//! three workloads (distinct, uniform, identical), each step timed with CUDA events. Also the
//! device's copy bandwidth, for the decode step's floor.
//!
//! usage: gpu_bench MODEL_DIR ADAPTER_DIR OUT.jsonl [--batch-sizes 1,2,4] [--prompt-len 128]
//!        [--num-tokens 32] [--num-adapters 32] [--rank 16] [--targets qkvo|all] [--eager]
//!        [--dtype bfloat16|float16]

use std::path::PathBuf;
use std::time::Instant;

use multilora_engine::cuda::elem::Elem;
use multilora_engine::demo::{synth_adapter, SynthSpec};
use multilora_engine::lora::LoraTarget;
use multilora_engine::{
    AdapterId, Device, EngineConfig, LLMEngine, LoadFormat, LoraRequest, ModelConfig, Prompt, SamplingParams,
};
use rand::{Rng, SeedableRng};
use serde_json::json;

struct Args {
    model: PathBuf,
    adapters: PathBuf,
    out: PathBuf,
    batch_sizes: Vec<usize>,
    prompt_len: usize,
    num_tokens: usize,
    num_adapters: usize,
    rank: usize,
    /// Adapter targets: `qkvo` (q, k, v, o) or `all` (the seven projections).
    targets: String,
    eager: bool,
    /// `bfloat16` or `float16`
    dtype: String,
    micro: bool,
    /// Time every prefill attention variant alone (`--attention`).
    attention: bool,
    /// Time decode attention alone (`--decode-attention`): the decode kernel against the
    /// tensor-core prefill kernel with split context, by batch and context length.
    decode_attention: bool,
    /// `--itl P`: decode steps of `--batch-sizes`' first streams while a P-token prompt arrives,
    /// under `--max-num-batched-tokens`.
    itl: Option<usize>,
    max_num_batched_tokens: Option<usize>,
    /// `--long-prefill-token-threshold N`: the engine setting (0: off).
    long_prefill_token_threshold: usize,
    /// Only these series (default: all four).
    series: Vec<String>,
    /// Bracket each measured run with cuProfilerStart/Stop (for `ncu --profile-from-start off`).
    profile: bool,
}

/// The series a run may measure.
const SERIES: [&str; 4] = ["no-lora", "distinct", "uniform", "identical"];

fn parse() -> Args {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        model: it.next().expect("MODEL_DIR").into(),
        adapters: it.next().expect("ADAPTER_DIR").into(),
        out: it.next().expect("OUT.jsonl").into(),
        batch_sizes: vec![1, 2, 4, 8, 16, 32],
        prompt_len: 128,
        num_tokens: 32,
        num_adapters: 32,
        rank: 16,
        targets: "qkvo".into(),
        eager: false,
        dtype: "bfloat16".into(),
        micro: false,
        attention: false,
        decode_attention: false,
        itl: None,
        max_num_batched_tokens: None,
        long_prefill_token_threshold: 0,
        series: SERIES.map(String::from).to_vec(),
        profile: false,
    };
    while let Some(flag) = it.next() {
        let mut val = || it.next().expect("flag value");
        match flag.as_str() {
            "--batch-sizes" => a.batch_sizes = val().split(',').map(|s| s.parse().unwrap()).collect(),
            "--prompt-len" => a.prompt_len = val().parse().unwrap(),
            "--num-tokens" => a.num_tokens = val().parse().unwrap(),
            "--num-adapters" => a.num_adapters = val().parse().unwrap(),
            "--rank" => a.rank = val().parse().unwrap(),
            "--targets" => a.targets = val(),
            "--eager" => a.eager = true,
            "--dtype" => a.dtype = val(),
            "--micro" => a.micro = true,
            "--attention" => a.attention = true,
            "--decode-attention" => a.decode_attention = true,
            "--itl" => a.itl = Some(val().parse().unwrap()),
            "--max-num-batched-tokens" => a.max_num_batched_tokens = Some(val().parse().unwrap()),
            "--long-prefill-token-threshold" => a.long_prefill_token_threshold = val().parse().unwrap(),
            "--series" => {
                a.series = val().split(',').map(String::from).collect();
                if let Some(bad) = a.series.iter().find(|s| !SERIES.contains(&s.as_str())) {
                    panic!("--series: unknown series {bad:?}, expected some of {SERIES:?}");
                }
            }
            "--profile" => a.profile = true,
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn synth_all(a: &Args, cfg: &ModelConfig) -> Vec<LoraRequest> {
    use LoraTarget::*;
    (0..a.num_adapters)
        .map(|i| {
            let dir = a.adapters.join(format!("lora-{i:03}"));
            if !dir.join("adapter_model.safetensors").exists() {
                let targets = match a.targets.as_str() {
                    "qkvo" => vec![QProj, KProj, VProj, OProj],
                    "all" => vec![QProj, KProj, VProj, OProj, GateProj, UpProj, DownProj],
                    t => panic!("--targets {t:?}: expected qkvo or all"),
                };
                let spec = SynthSpec {
                    rank: a.rank,
                    lora_alpha: 2.0 * a.rank as f32,
                    targets,
                    use_rslora: false,
                    seed: i as u64,
                };
                synth_adapter(&dir, cfg, "dummy", &spec).expect("synth adapter");
            }
            LoraRequest {
                name: format!("lora-{i}"),
                id: AdapterId(i as u32 + 1),
                path: dir,
            }
        })
        .collect()
}

/// Bytes a decode step must read at least: every projection and lm_head weight once (16-bit),
/// the KV cache of every sequence, and the adapters in use.
fn floor_bytes(
    cfg: &ModelConfig,
    batch: usize,
    ctx: usize,
    num_adapters: usize,
    rank: usize,
    all: bool,
) -> f64 {
    let (h, q, kv, i, l) = (
        cfg.hidden_size,
        cfg.q_size(),
        cfg.kv_size(),
        cfg.intermediate_size,
        cfg.num_hidden_layers,
    );
    let weights = 2.0 * (l * (h * (q + 2 * kv) + q * h + 3 * h * i) + cfg.vocab_size * h) as f64;
    let kv_bytes = 2.0 * (batch * ctx * l * 2 * kv) as f64;
    let mlp = if all { 3 * (h + i) } else { 0 };
    let adapter = 2.0 * (l * rank * ((h + q) + (h + kv) * 2 + (q + h) + mlp)) as f64;
    weights + kv_bytes + num_adapters as f64 * adapter
}

fn copy_bandwidth() -> f64 {
    use cudarc::driver::result as drv;
    let gpu = multilora_engine::cuda::gpu::Gpu::new(0, Elem::Bf16).expect("gpu");
    let bytes = 4usize << 30;
    let (a, b) = (gpu.alloc(bytes).unwrap(), gpu.alloc(bytes).unwrap());
    let (e0, e1) = (gpu.timing_event().unwrap(), gpu.timing_event().unwrap());
    let copy = || unsafe { drv::memcpy_dtod_async(b.ptr, a.ptr, bytes, gpu.stream.cu_stream()) }.unwrap();
    for _ in 0..3 {
        copy();
    }
    let reps = 20;
    e0.record(&gpu.stream).unwrap();
    for _ in 0..reps {
        copy();
    }
    e1.record(&gpu.stream).unwrap();
    gpu.sync().unwrap();
    let s = e0.elapsed_ms(&e1).unwrap() as f64 / 1e3;
    2.0 * bytes as f64 * reps as f64 / s
}

/// The skinny GEMM against cuBLAS on every projection of the model (weights streamed once per
/// pass, far more than L2), for token counts 1..32.
/// Every prefill attention variant on the model's heads, alone, over a random paged cache:
/// B prompts of P tokens from position 0, median of 5 launches, in TFLOP/s of causal attention
/// (4 · head_dim · heads · P(P+1)/2 a prompt).
fn attention(cfg: &ModelConfig, elem: Elem) {
    use multilora_engine::cuda::gpu::{cfg as lcfg, Gpu, KernelArg};
    use multilora_engine::cuda::prefill;
    let gpu = Gpu::new(0, elem).expect("gpu");
    let (nh, nkv, hd, bs) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 16);
    let (kvs, ld) = (nkv * hd, (nh + 2 * nkv) * hd);
    let fill = |ptr: u64, n: usize, seed: u64| {
        let args = [ptr, n as u64, seed, 1.0f32.bits()];
        unsafe { gpu.launch("fill_uniform", lcfg((4096, 1, 1), 256), &args) }.unwrap();
    };
    for (b, p) in [(32usize, 128usize), (4, 2048), (1, 4096), (1, 32768)] {
        let t = b * p;
        let max_blocks = p.div_ceil(bs);
        let tables: Vec<u32> = (0..(b * max_blocks) as u32).collect();
        let positions: Vec<u32> = (0..t).map(|i| (i % p) as u32).collect();
        let token_seq: Vec<u32> = (0..t).map(|i| (i / p) as u32).collect();
        let query_start: Vec<u32> = (0..=b).map(|i| (i * p) as u32).collect();
        let up = |v: &[u32]| {
            let buf = gpu.alloc(v.len() * 4).unwrap();
            gpu.htod(buf.ptr, v).unwrap();
            buf
        };
        let (tab_d, pos_d, seq_d) = (up(&tables), up(&positions), up(&token_seq));
        let qkv = gpu.alloc(t * ld * 4).unwrap();
        let q16 = gpu.alloc(t * ld * 2).unwrap();
        fill(q16.ptr, t * ld, 3); // bits of random 16-bit values, reread as f32 pairs: finite
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(qkv.ptr, q16.ptr, t * ld * 2, gpu.stream.cu_stream())
        }
        .unwrap();
        let (kc, vc) = (gpu.alloc(t * kvs * 2).unwrap(), gpu.alloc(t * kvs * 2).unwrap());
        fill(kc.ptr, t * kvs, 4);
        fill(vc.ptr, t * kvs, 5);
        let out = gpu.alloc(t * nh * hd * 2).unwrap();
        let flops = 4.0 * (hd * nh) as f64 * (b * p * (p + 1) / 2) as f64;
        for k in prefill::VARIANTS
            .iter()
            .filter(|k| hd <= k.head_dim && hd > k.head_dim / 2)
        {
            let mut tiles = vec![0u32; 4 * t];
            let packed = prefill::pack_tiles(
                &query_start,
                &positions,
                k.tokens_per_tile(nh / nkv),
                k.keys,
                None,
                &mut tiles,
                &mut [],
            );
            let tiles_d = up(&tiles[..4 * packed.tiles]);
            let inputs = prefill::Inputs {
                qkv: qkv.ptr,
                ld,
                out: out.ptr,
                k_cache: kc.ptr,
                v_cache: vc.ptr,
                tiles: tiles_d.ptr,
                merges: 0,
                packed,
                part: 0,
                token_seq: seq_d.ptr,
                positions: pos_d.ptr,
                block_tables: tab_d.ptr,
                max_blocks,
                block_size: bs,
            };
            let med = median_ms(&gpu, &|| prefill::launch(&gpu, *k, &inputs, nh, nkv, hd).unwrap());
            println!(
                "attention {b:>2}x{p:<5} {:>28}: {med:8.3} ms a layer, {:6.1} TFLOP/s",
                k.name,
                flops / med / 1e9
            );
        }
    }
}

/// Median device time of `run`'s launches over 5 runs after a warm-up, in ms.
fn median_ms(gpu: &multilora_engine::cuda::gpu::Gpu, run: &dyn Fn()) -> f64 {
    let (e0, e1) = (gpu.timing_event().unwrap(), gpu.timing_event().unwrap());
    let mut ms = Vec::new();
    for _ in 0..6 {
        e0.record(&gpu.stream).unwrap();
        run();
        e1.record(&gpu.stream).unwrap();
        gpu.sync().unwrap();
        ms.push(e0.elapsed_ms(&e1).unwrap() as f64);
    }
    ms.remove(0);
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

/// Decode attention alone, one layer, over a random paged cache: B sequences of one query token
/// at context C, by the decode kernel the step plan picks (`decode_attention`, context split in
/// parts) and by the tensor-core prefill kernel (a tile a sequence holding its GQA group's
/// heads, long tiles split into pieces as the model splits them). Median of 5 launches; the
/// KV bytes read over that time against the copy bandwidth `bw` (read + write of a copy).
fn decode_attention(cfg: &ModelConfig, elem: Elem, bw: f64) {
    use multilora_engine::cuda::gpu::{cfg as lcfg, Gpu};
    use multilora_engine::cuda::kernels::{
        DECODE_ATT_MAX_PARTS, DECODE_ATT_THREADS, DECODE_ATT_WIDE_THREADS,
    };
    use multilora_engine::cuda::launch;
    use multilora_engine::cuda::model::StepShape;
    use multilora_engine::cuda::plan::{Attention, Caps, StepPlan};
    use multilora_engine::cuda::prefill;
    let gpu = Gpu::new(0, elem).expect("gpu");
    let (nh, nkv, hd, bs) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 16);
    let (kvs, ld) = (nkv * hd, (nh + 2 * nkv) * hd);
    let Some(k) = prefill::kernel(hd, nh / nkv) else {
        println!("decode-attention: no prefill attention kernel for head_dim {hd}");
        return;
    };
    let caps = Caps {
        elem,
        skinny_max_m: 8,
        num_sms: gpu.num_sms as usize,
        prefill_attention: true,
    };
    let up = |v: &[u32]| {
        let buf = gpu.alloc(v.len().max(1) * 4).unwrap();
        gpu.htod(buf.ptr, v).unwrap();
        buf
    };
    let fill = |ptr: u64, n: usize, seed: u64| {
        // SAFETY: fill_uniform over the n elements of a buffer just allocated.
        unsafe { launch::fill_uniform(&gpu, lcfg((4096, 1, 1), 256), ptr, n as u64, seed, 1.0) }.unwrap();
    };
    let time = |run: &dyn Fn()| median_ms(&gpu, run);
    for (b, c) in [
        (1usize, 128usize),
        (1, 4096),
        (1, 32768),
        (8, 4096),
        (32, 1024),
        (32, 4096),
        (128, 1024),
        (256, 512),
        (256, 4096),
    ] {
        let max_blocks = c.div_ceil(bs);
        // Sequence i's block j is physical block i * max_blocks + j.
        let tables: Vec<u32> = (0..(b * max_blocks) as u32).collect();
        let positions = vec![(c - 1) as u32; b];
        let token_seq: Vec<u32> = (0..b as u32).collect();
        let query_start: Vec<u32> = (0..=b as u32).collect();
        let (tab_d, pos_d, seq_d) = (up(&tables), up(&positions), up(&token_seq));
        let slots = b * max_blocks * bs;
        let qkv = gpu.alloc(b * ld * 4).unwrap();
        let (kc, vc) = (
            gpu.alloc(slots * kvs * 2).unwrap(),
            gpu.alloc(slots * kvs * 2).unwrap(),
        );
        fill(kc.ptr, slots * kvs, 4);
        fill(vc.ptr, slots * kvs, 5);
        // q stays zero (allocations are zeroed): uniform attention, which times the same.
        let out = gpu.alloc(b * nh * hd * 2).unwrap();
        let kv_bytes = (2 * b * c * kvs * 2) as f64;
        let shape = StepShape {
            num_tokens: b,
            num_seqs: b,
            lora_mask: 0,
            num_lora_segments: 0,
            att_tiles: prefill::Packed::default(),
        };
        let att_part = gpu.alloc(b * nh * DECODE_ATT_MAX_PARTS * (hd + 2) * 4).unwrap();
        let att_count = gpu.alloc(b * nh * 4).unwrap();
        let decode_ms = match StepPlan::new(cfg, &caps, &shape).layer.attention {
            Attention::Decode { parts, wide } => {
                let (name, threads) = match wide {
                    true => ("decode_attention_wide", DECODE_ATT_WIDE_THREADS),
                    false => ("decode_attention", DECODE_ATT_THREADS),
                };
                let run = || {
                    // SAFETY: every buffer above is sized for b sequences of context c.
                    unsafe {
                        launch::decode_attention(
                            &gpu,
                            name,
                            lcfg((b as u32, nh as u32, parts), threads),
                            qkv.ptr,
                            ld as i32,
                            out.ptr,
                            kc.ptr,
                            vc.ptr,
                            pos_d.ptr,
                            tab_d.ptr,
                            max_blocks as i32,
                            bs as i32,
                            nh as i32,
                            nkv as i32,
                            hd as i32,
                            1.0 / (hd as f32).sqrt(),
                            att_part.ptr,
                            att_count.ptr,
                        )
                    }
                    .unwrap()
                };
                Some(time(&run))
            }
            _ => None,
        };
        let split = prefill::Split {
            nkv,
            target_blocks: 2 * gpu.num_sms as usize,
            max_pieces: 4 * gpu.num_sms as usize / nkv,
        };
        let max_pieces = split.max_pieces;
        let (mut tiles, mut merges) = (vec![0u32; 4 * (b + max_pieces)], vec![0u32; 2 * max_pieces]);
        let per = k.tokens_per_tile(nh / nkv);
        let packed = prefill::pack_tiles(
            &query_start,
            &positions,
            per,
            k.keys,
            Some(split),
            &mut tiles,
            &mut merges,
        );
        let (tiles_d, merges_d) = (up(&tiles[..4 * packed.tiles]), up(&merges[..4 * packed.merges]));
        let part = gpu.alloc((max_pieces * nkv * k.piece_len() * 4).max(4)).unwrap();
        let inputs = prefill::Inputs {
            qkv: qkv.ptr,
            ld,
            out: out.ptr,
            k_cache: kc.ptr,
            v_cache: vc.ptr,
            tiles: tiles_d.ptr,
            merges: merges_d.ptr,
            packed,
            part: part.ptr,
            token_seq: seq_d.ptr,
            positions: pos_d.ptr,
            block_tables: tab_d.ptr,
            max_blocks,
            block_size: bs,
        };
        let fa_ms = time(&|| prefill::launch(&gpu, k, &inputs, nh, nkv, hd).unwrap());
        let frac = |ms: f64| kv_bytes / (ms / 1e3) / (bw / 2.0);
        let decode = decode_ms.map_or("  (not taken)".to_string(), |ms| {
            format!("{:8.1} us {:5.1}%", ms * 1e3, 100.0 * frac(ms))
        });
        println!(
            "decode-attention {b:>3}x{c:<5} decode kernel {decode} | prefill kernel ({} tiles, {} merges) {:8.1} us {:5.1}% of copy bandwidth",
            packed.tiles,
            packed.merges,
            fa_ms * 1e3,
            100.0 * frac(fa_ms)
        );
    }
}

/// Streams decoding while a long prompt arrives (chunked prefill): `streams` requests of
/// `--prompt-len` tokens decode 300 steps; the wall time of each step is every stream's
/// inter-token latency. Steps 0..150 have no arrival; at step 150 a `long`-token prompt arrives.
/// Prints p50 / p99 / max of the steps without and with the arrival (up to the last step before
/// the long prompt's first token, and the 150 steps from its arrival).
fn itl(engine: &mut LLMEngine, streams: usize, long: usize, a: &Args) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let vocab = engine.model_config().vocab_size as u32;
    let mut prompt = |n: usize| Prompt::TokenIds((0..n).map(|_| rng.random_range(3..vocab)).collect());
    let params = |n: usize| SamplingParams {
        ignore_eos: true,
        min_tokens: n,
        ..SamplingParams::greedy(n)
    };
    for i in 0..streams {
        engine
            .add_request(&format!("s{i}"), prompt(a.prompt_len), params(400), None)
            .expect("add request");
    }
    // Until every stream decodes (its prefill done).
    while engine.last_step_stats().num_decode_tokens < streams {
        engine.step().expect("step");
    }
    let mut steps = Vec::new();
    // Device time of each step (CUDA events around its kernels), to tell host time from GPU time.
    let mut device = Vec::new();
    let mut first_token = None;
    for k in 0..300 {
        if k == 150 {
            engine
                .add_request("long", prompt(long), params(1), None)
                .expect("add request");
        }
        // --profile: one decode step before the arrival and the second step after it (a chunk
        // of the long prompt beside the streams' decodes, when it is chunked).
        let profiled = a.profile && (k == 140 || k == 151);
        if profiled {
            // SAFETY: profiler start/stop only toggle collection for an attached profiler.
            unsafe { cudarc::driver::sys::cuProfilerStart() };
        }
        let t = Instant::now();
        let outs = engine.step().expect("step");
        steps.push(t.elapsed().as_secs_f64() * 1e3);
        if profiled {
            // SAFETY: as cuProfilerStart above.
            unsafe { cudarc::driver::sys::cuProfilerStop() };
        }
        let st = engine.last_step_stats();
        device.push(st.device_time.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3));
        assert!(
            st.num_decode_tokens >= streams,
            "step {k}: a stream did not decode"
        );
        if outs.iter().any(|o| &*o.request_id == "long") && first_token.is_none() {
            first_token = Some(k);
        }
    }
    let stats = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        (q(0.5), q(0.99), v[v.len() - 1])
    };
    let (b50, b99, bmax) = stats(&steps[..150]);
    let (w50, w99, wmax) = stats(&steps[150..]);
    let ttft = first_token.map_or(f64::NAN, |k| steps[150..=k].iter().sum::<f64>());
    // The steps that held part of the long prompt, wall and device time.
    let chunk_steps = 150..first_token.map_or(151, |k| k + 1);
    let (c50, c99, _) = stats(&steps[chunk_steps.clone()]);
    let (d50, d99, _) = stats(&device[chunk_steps]);
    let (dd50, _, _) = stats(&device[..150]);
    println!(
        "itl streams {streams} prompt {} long {long} max_num_batched_tokens {} long_prefill_token_threshold {}: no arrival p50 {b50:.2} p99 {b99:.2} max {bmax:.2} ms; \
         with arrival p50 {w50:.2} p99 {w99:.2} max {wmax:.2} ms (p99 x{:.2}); long prompt's first token after {} steps, {ttft:.1} ms; \
         steps with a chunk: wall p50 {c50:.2} p99 {c99:.2}, device p50 {d50:.2} p99 {d99:.2} ms (decode-only device p50 {dd50:.2})",
        a.prompt_len,
        engine.resolved().max_num_batched_tokens,
        engine.resolved().long_prefill_token_threshold,
        w99 / b99,
        first_token.map_or(0, |k| k - 149)
    );
}

fn micro(cfg: &ModelConfig, bw: f64, elem: Elem) {
    use multilora_engine::cuda::gpu::{cfg as lcfg, Gpu, KernelArg};
    use multilora_engine::cuda::model::linear;
    use multilora_engine::cuda::skinny::{self, Epilogue, NormIo, SKINNY_MAX_M};
    let mut gpu = Gpu::new(0, elem).expect("gpu");
    let (h, q, kv, i) = (
        cfg.hidden_size,
        cfg.q_size(),
        cfg.kv_size(),
        cfg.intermediate_size,
    );
    let mut shapes = Vec::new(); // (n, k)
    for _ in 0..cfg.num_hidden_layers {
        shapes.extend([(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]);
    }
    shapes.push((cfg.vocab_size, h));
    let fill = |buf: &multilora_engine::cuda::gpu::DevBuf, n: usize| {
        let args = [buf.ptr, n as u64, 7, 0.05f32.bits()];
        // SAFETY: fill_uniform takes (out, n, seed, bound); `buf` holds n elements.
        unsafe { gpu.launch("fill_uniform", lcfg((65536, 1, 1), 256), &args) }.unwrap();
    };
    let ws: Vec<_> = shapes
        .iter()
        .map(|&(n, k)| {
            let w = gpu.alloc(n * k * 2).unwrap();
            fill(&w, n * k);
            w
        })
        .collect();
    let bytes: f64 = shapes.iter().map(|&(n, k)| (n * k * 2) as f64).sum();
    let x = gpu.alloc(32 * i.max(h) * 2).unwrap();
    fill(&x, 32 * i.max(h));
    let y = gpu.alloc(32 * cfg.vocab_size.max(2 * i) * 4).unwrap();
    let tuning = &multilora_engine::cuda::skinny::TUNING;
    gpu.load(tuning).expect("tuning kernels");
    let (e0, e1) = (gpu.timing_event().unwrap(), gpu.timing_event().unwrap());
    // Milliseconds per call of `pass` (one warm-up, then the mean of five).
    let time = |pass: &dyn Fn()| {
        pass();
        e0.record(&gpu.stream).unwrap();
        for _ in 0..5 {
            pass();
        }
        e1.record(&gpu.stream).unwrap();
        gpu.sync().unwrap();
        e0.elapsed_ms(&e1).unwrap() as f64 / 5.0
    };
    let report = |what: &str, ms: f64, bytes: f64| {
        println!(
            "micro {what:>34}: {ms:7.3} ms, {:.2} TB/s ({:.1}% of copy)",
            bytes / ms / 1e9,
            100.0 * bytes / (ms / 1e3) / bw
        );
    };
    // One skinny launch of `name` on weight `i`, one token, K cut into `split` shares, blocks of
    // `threads`.
    let launch_w = |name: &'static str, i: usize, split: u32, threads: u32| {
        let (n, k) = shapes[i];
        let mut args = [0u64; 8 + skinny::NORM_ARGS];
        args[..8].copy_from_slice(&[
            x.ptr,
            ws[i].ptr,
            0,
            y.ptr,
            1i32.bits(),
            (n as i32).bits(),
            (k as i32).bits(),
            (n as i32).bits(),
        ]);
        args[8..].copy_from_slice(&NormIo::NONE.args());
        // SAFETY: the skinny kernels take (x, W, bias, y, M, N, K, ldy, NormArgs); the buffers
        // hold these shapes.
        unsafe { gpu.launch(name, lcfg((n.div_ceil(16) as u32, split, 1), threads), &args) }.unwrap();
    };
    let launch = |name: &'static str, i: usize, split: u32| launch_w(name, i, split, 256);
    println!("micro: {:.2} GB of projection weights per pass", bytes / 1e9);
    // The read-only ceiling: every weight streamed once by a kernel that only loads and sums.
    let sink = gpu.alloc(4).unwrap();
    let read = |i: usize| {
        let (n, k) = shapes[i];
        let args = [ws[i].ptr, ((n * k * 2 / 16) as u64), sink.ptr];
        // SAFETY: read_stream takes (p, number of 16-byte vectors, sink); ws[i] holds n * k elems.
        unsafe { gpu.launch("read_stream", lcfg((gpu.num_sms * 8, 1, 1), 256), &args) }.unwrap();
    };
    report(
        "read-only, every weight",
        time(&|| (0..ws.len()).for_each(read)),
        bytes,
    );
    // Each projection kind alone (one launch per layer), one token.
    let kinds = ["q/k/v", "o", "gate/up", "down"];
    for (j, kind) in kinds.iter().enumerate() {
        let idx: Vec<usize> = (j..ws.len() - 1).step_by(4).collect();
        let kb: f64 = idx.iter().map(|&i| (shapes[i].0 * shapes[i].1 * 2) as f64).sum();
        report(
            &format!("{kind} read-only"),
            time(&|| idx.iter().for_each(|&i| read(i))),
            kb,
        );
        report(
            &format!("{kind} skinny_store_8"),
            time(&|| idx.iter().for_each(|&i| launch("skinny_store_8", i, 1))),
            kb,
        );
        for split in [1, 2, 3, 4] {
            let ms = time(&|| idx.iter().for_each(|&i| launch("skinny_add_8", i, split)));
            report(&format!("{kind} skinny_add_8 split-K {split}"), ms, kb);
        }
        let (wide, threads) = (skinny::ADD_WIDE, skinny::ADD_WIDE_THREADS);
        let ms = time(&|| idx.iter().for_each(|&i| launch_w(wide, i, 1, threads)));
        report(&format!("{kind} {wide}"), ms, kb);
        for &name in tuning.kernels.iter().filter(|k| k.starts_with("skinny")) {
            let ms = time(&|| idx.iter().for_each(|&i| launch(name, i, 1)));
            report(&format!("{kind} {name}"), ms, kb);
        }
    }
    // Tuning variants of the Store kernel over every projection, one token.
    for &name in ["skinny_store_8"]
        .iter()
        .chain(tuning.kernels.iter().filter(|k| k.starts_with("skinny")))
    {
        let ms = time(&|| (0..ws.len()).for_each(|i| launch(name, i, 1)));
        report(&format!("m= 1 {name}"), ms, bytes);
    }
    for m in [1usize, 2, 4, 8, 16, 32] {
        for (name, gm) in [("skinny", SKINNY_MAX_M), ("cublas", 0)] {
            let ms = time(&|| {
                for (w, &(n, k)) in ws.iter().zip(&shapes) {
                    linear(
                        &gpu,
                        gm,
                        Epilogue::Store,
                        w.ptr,
                        None,
                        n,
                        k,
                        x.ptr,
                        y.ptr,
                        m,
                        n,
                        0,
                        NormIo::NONE,
                    )
                    .unwrap();
                }
            });
            report(&format!("m={m:>2} {name}"), ms, bytes);
        }
    }
}

fn main() {
    let a = parse();
    let elem = Elem::from_dtype(&a.dtype, None)
        .unwrap_or_else(|| panic!("--dtype {:?}: expected bfloat16 or float16", a.dtype));
    let bw = copy_bandwidth();
    println!("device copy bandwidth (read + write): {:.3} TB/s", bw / 1e12);
    let cfg = ModelConfig::from_dir(&a.model).expect("config.json");
    if a.micro {
        micro(&cfg, bw, elem);
        return;
    }
    if a.attention {
        attention(&cfg, elem);
        return;
    }
    if a.decode_attention {
        decode_attention(&cfg, elem, bw);
        return;
    }
    let t0 = Instant::now();
    let loras = synth_all(&a, &cfg);
    println!(
        "{} adapters ready in {:.1}s",
        loras.len(),
        t0.elapsed().as_secs_f64()
    );

    let max_batch = *a.batch_sizes.iter().max().unwrap();
    let mut ec = EngineConfig::new(&a.model);
    // bench/gpu.sh's sweep and ab steps set these.
    ec.cuda
        .apply_vars(|k| std::env::var(k).ok())
        .expect("CUDA switches");
    ec.load_format = LoadFormat::Dummy;
    ec.device = Device::Cuda;
    ec.dtype = elem.name().into();
    // --itl: room for the long prompt beside the streams.
    ec.max_num_seqs = max_batch.max(1) + usize::from(a.itl.is_some());
    let longest = a.prompt_len.max(a.itl.unwrap_or(0)) + a.num_tokens + 16;
    let max_model_len = longest.next_power_of_two().max(256);
    ec.max_model_len = Some(max_model_len);
    // The whole batch's prompts in one step (prefill measured unchunked) unless asked otherwise.
    let whole = (max_batch * a.prompt_len).max(max_model_len);
    ec.max_num_batched_tokens = Some(a.max_num_batched_tokens.unwrap_or(whole));
    ec.long_prefill_token_threshold = a.long_prefill_token_threshold;
    ec.enable_lora = true;
    ec.max_loras = a.num_adapters;
    ec.max_cpu_loras = Some(a.num_adapters);
    ec.max_lora_rank = a.rank;
    ec.enforce_eager = a.eager;
    let t0 = Instant::now();
    let mut engine = LLMEngine::new(ec).expect("engine");
    println!(
        "engine on {} loaded in {:.1}s",
        engine.device_name(),
        t0.elapsed().as_secs_f64()
    );

    if let Some(p) = a.itl {
        itl(&mut engine, max_batch, p, &a);
        return;
    }
    let mut out = std::fs::File::create(&a.out).expect("out file");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let vocab = cfg.vocab_size as u32;
    let series: Vec<&str> = a.series.iter().map(String::as_str).collect();
    println!(
        "{:>10} {:>5} {:>11} {:>11} {:>10} {:>9}",
        "series", "batch", "prefill_ms", "decode_ms", "floor_ms", "x_floor"
    );
    for &b in &a.batch_sizes {
        for &s in &series {
            if s == "distinct" && b > loras.len() {
                continue;
            }
            let adapters: Vec<Option<usize>> = (0..b)
                .map(|i| match s {
                    "no-lora" => None,
                    "distinct" => Some(i),
                    "uniform" => Some(rng.random_range(0..loras.len())),
                    _ => Some(0), // identical
                })
                .collect();
            let num_distinct = {
                let mut v: Vec<usize> = adapters.iter().flatten().copied().collect();
                v.sort();
                v.dedup();
                v.len()
            };
            let mut run = |num_tokens: usize| -> (Vec<f64>, f64) {
                for (i, ad) in adapters.iter().enumerate() {
                    let prompt: Vec<u32> = (0..a.prompt_len).map(|_| rng.random_range(3..vocab)).collect();
                    let params = SamplingParams {
                        ignore_eos: true,
                        min_tokens: num_tokens,
                        ..SamplingParams::greedy(num_tokens)
                    };
                    let lora = ad.map(|k| &loras[k]);
                    engine
                        .add_request(&format!("{s}-{b}-{i}"), Prompt::TokenIds(prompt), params, lora)
                        .expect("add request");
                }
                let mut steps = Vec::new();
                let t = Instant::now();
                while engine.has_unfinished_requests() {
                    engine.step().expect("step");
                    let st = engine.last_step_stats();
                    steps.push(st.device_time.unwrap_or(st.duration).as_secs_f64() * 1e3);
                }
                (steps, t.elapsed().as_secs_f64() * 1e3)
            };
            // Warm-up: loads adapters into slots, captures this bucket's graph.
            run(4);
            if a.profile {
                // SAFETY: profiler start/stop only toggle collection for an attached profiler.
                unsafe { cudarc::driver::sys::cuProfilerStart() };
            }
            let (steps, e2e) = run(a.num_tokens);
            if a.profile {
                // SAFETY: as cuProfilerStart above.
                unsafe { cudarc::driver::sys::cuProfilerStop() };
            }
            let num_decode = a.num_tokens - 1;
            let prefill: f64 = steps[..steps.len() - num_decode].iter().sum();
            let decode = steps[steps.len() - num_decode..].iter().sum::<f64>() / num_decode as f64;
            let ctx = a.prompt_len + a.num_tokens / 2;
            let floor_ms = floor_bytes(&cfg, b, ctx, num_distinct, a.rank, a.targets == "all") / bw * 1e3;
            println!(
                "{s:>10} {b:>5} {prefill:>11.3} {decode:>11.3} {floor_ms:>10.3} {:>9.2}",
                decode / floor_ms
            );
            let rec = json!({
                "series": s, "batch_size": b, "prompt_len": a.prompt_len, "num_tokens": a.num_tokens,
                "model": a.model, "rank": a.rank, "targets": a.targets,
                "num_adapters_in_batch": num_distinct, "prefill_ms": prefill, "decode_ms": decode,
                "e2e_wall_ms": e2e, "floor_ms": floor_ms, "copy_bw_bytes_per_s": bw, "steps_ms": steps,
                "eager": a.eager, "device": engine.device_name(), "dtype": engine.resolved().dtype,
            });
            use std::io::Write;
            writeln!(out, "{rec}").unwrap();
        }
    }
}
