//! Multi-LoRA on the device: the SGMV (segmented, prefill) and BGMV (decode) shrink and expand
//! kernels against host reference loops and against each other, and adapter uploads overlapped
//! with steps against synchronous ones through the engine. Skipped, with a note, where no CUDA
//! driver is found (CI).

mod common;

use common::gpu::{cpu_next_logits, download, have_gpu, logits_tolerance, upload};
use common::{case_dir, max_abs, max_diff};
use multilora_engine::cuda::elem::Elem;
use multilora_engine::cuda::gpu::{DevBuf, Gpu};
use multilora_engine::cuda::sgmv::{self, GroupWeights, Segments};
use multilora_engine::lora::LoraSlot;
use multilora_engine::{Device, EngineConfig, LLMEngine, LoraRequest, Prompt, SamplingParams};
use rand::{Rng, SeedableRng};

/// What a many-adapter run on the GPU produced, per request.
struct UploadRun {
    tokens: Vec<Vec<u32>>,
    /// the logits of every output token, concatenated
    logits: Vec<Vec<f32>>,
    first_logits: Vec<Vec<f32>>,
    slot_loads: u64,
}

const NUM_UPLOAD_REQUESTS: usize = 120;

/// Request `i` of the many-adapter runs: its prompt (2 to 4 tokens), adapter and length.
fn upload_request(i: usize, num_adapters: usize) -> (Vec<u32>, usize, usize) {
    let prompt = (0..2 + i % 3)
        .map(|j| ((7 + 13 * i + 31 * j) % 380) as u32)
        .collect();
    (prompt, (i * 7) % num_adapters, 4 + i % 5)
}

/// [`NUM_UPLOAD_REQUESTS`] requests over `loras` on the golden llama model with 4 slots and 8
/// sequences a step: as requests finish, the next ones bring other adapters into slots freed
/// between steps while the rest keep decoding. Adapters are registered up front, all in host
/// memory, so every run schedules the same steps.
/// `max_cpu_loras`: the host cache (all adapters when `None`; fewer: adapters are evicted and
/// loaded again on the loader threads, into recycled pinned buffers).
fn uploads_run(loras: &[LoraRequest], sync_lora_uploads: bool, max_cpu_loras: Option<usize>) -> UploadRun {
    let mut cfg = EngineConfig::new(case_dir("llama").join("model"));
    cfg.device = Device::Cuda;
    cfg.dtype = "bfloat16".into();
    cfg.return_logits = true;
    cfg.enable_lora = true;
    cfg.max_loras = 4;
    cfg.max_lora_rank = 16;
    cfg.max_cpu_loras = Some(max_cpu_loras.unwrap_or(loras.len()));
    cfg.max_model_len = Some(64);
    cfg.max_num_seqs = 8;
    cfg.sync_lora_uploads = sync_lora_uploads;
    // Overlapped, each slot's copies start 2 ms late: a step that did not wait for them would
    // read the slot unwritten (or half written) and its logits would differ.
    cfg.cuda.upload_delay_us = if sync_lora_uploads { 0 } else { 2000 };
    let mut engine = LLMEngine::new(cfg).expect("engine loads");
    for l in loras {
        engine.add_lora(l).expect("adapter loads");
    }
    for i in 0..NUM_UPLOAD_REQUESTS {
        let (prompt, a, n) = upload_request(i, loras.len());
        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(n)
        };
        engine
            .add_request(&i.to_string(), Prompt::TokenIds(prompt), params, Some(&loras[a]))
            .unwrap();
    }
    let k = NUM_UPLOAD_REQUESTS;
    let mut run = UploadRun {
        tokens: vec![Vec::new(); k],
        logits: vec![Vec::new(); k],
        first_logits: vec![Vec::new(); k],
        slot_loads: 0,
    };
    while engine.has_unfinished_requests() {
        for o in engine.step().unwrap() {
            let i: usize = o.request_id.parse().unwrap();
            let logits = engine.last_logits(&o.request_id).expect("return_logits");
            run.logits[i].extend_from_slice(logits);
            if o.num_output_tokens == 1 {
                run.first_logits[i] = logits.to_vec();
            }
            if o.is_finished() {
                run.tokens[i] = o.output_token_ids;
            }
        }
    }
    run.slot_loads = engine.lora_stats().unwrap().slot_loads;
    run
}

/// Adapter copies ordered with events (an upload stream; each step waits for the slots filled
/// since the last, and a slot is overwritten only after the steps that read it) compute what
/// copies the host waits for compute: 50 adapters of mixed ranks (2 to 16) and targets through
/// 4 slots, replaced between steps while other sequences decode (graphs) or prefill (eager);
/// overlapped, every slot's copies start 2 ms late (`CudaOptions::upload_delay_us`), so only the
/// events keep a step from reading a slot before its copies land.
/// And the first token of every seventh request agrees with the CPU backend, so the slots held
/// the right weights, not merely the same ones both ways.
#[test]
fn cuda_overlapped_adapter_uploads_match_synchronous() {
    if !have_gpu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let loras = common::synth_adapters(tmp.path(), 50);
    let synced = uploads_run(&loras, true, None);
    let overlapped = uploads_run(&loras, false, None);
    assert_eq!(
        synced.slot_loads, overlapped.slot_loads,
        "both runs scheduled alike"
    );
    assert!(
        synced.slot_loads >= 50 && synced.slot_loads >= NUM_UPLOAD_REQUESTS as u64 / 2,
        "slots were replaced many times: {} slot loads",
        synced.slot_loads
    );
    for i in 0..NUM_UPLOAD_REQUESTS {
        let (prompt, a, n) = upload_request(i, loras.len());
        assert_eq!(overlapped.tokens[i].len(), n, "request {i}");
        assert_eq!(
            overlapped.tokens[i], synced.tokens[i],
            "request {i} (adapter {a}): overlapped vs synchronous uploads"
        );
        let d = max_diff(&overlapped.logits[i], &synced.logits[i]);
        assert!(
            overlapped.logits[i].len() == synced.logits[i].len() && d <= 1e-5,
            "request {i} (adapter {a}): logits differ by {d} between overlapped and synchronous uploads"
        );
        if i % 7 == 0 {
            assert_first_logits_match_cpu(i, &prompt, &loras[a], &overlapped.first_logits[i]);
        }
    }
}

/// A host cache of 6 for 50 adapters: every few requests an adapter is evicted (its pinned
/// buffer back to the pool) and another loaded into a recycled buffer on a loader thread, while
/// the overlapped copies start 2 ms late. A buffer handed on while a copy still read it, or a
/// slot filled from the wrong adapter's data, would move the first logits away from the CPU
/// backend's for that adapter; every request is checked (the schedule depends on load timing,
/// so the runs above are not a reference here).
#[test]
fn cuda_recycled_pinned_buffers_hold_each_adapter() {
    if !have_gpu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let loras = common::synth_adapters(tmp.path(), 50);
    let run = uploads_run(&loras, false, Some(6));
    for i in 0..NUM_UPLOAD_REQUESTS {
        let (prompt, a, n) = upload_request(i, loras.len());
        assert_eq!(run.tokens[i].len(), n, "request {i}");
        assert_first_logits_match_cpu(i, &prompt, &loras[a], &run.first_logits[i]);
    }
}

/// Request `i`'s first logits (bf16 on the GPU) against the CPU backend's for its adapter.
fn assert_first_logits_match_cpu(i: usize, prompt: &[u32], lora: &LoraRequest, got: &[f32]) {
    let want = cpu_next_logits("llama", prompt, &[], Some(lora));
    let rel = max_diff(got, &want) / max_abs(&want).max(1e-6);
    assert!(
        rel < logits_tolerance(Elem::Bf16),
        "request {i} (adapter {}): first logits differ from the CPU backend's by {rel} (relative)",
        lora.name
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
/// `cuda_lora --ignored --nocapture cuda_sgmv_timing` (the `cuda_lora` test binary).
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
