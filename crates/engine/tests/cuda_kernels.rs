//! The CUDA kernels alone, each against what it replaces or a reference computed here, on
//! shapes nobody tuned for: the skinny GEMM against cuBLAS, its RoPE epilogue, the split RMSNorm,
//! decode attention and tensor-core prefill attention, in bf16 and f16. Skipped, with a note,
//! where no CUDA driver is found (CI).

mod common;

use common::gpu::{download, fill_uniform, have_gpu, upload};
use common::{max_abs, max_diff};
use multilora_engine::cuda::elem::Elem;
use multilora_engine::cuda::gpu::{DevBuf, Gpu};
use rand::{Rng, SeedableRng};

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
/// and 80 (padded), 16-token blocks scattered, a 2,100-token prompt, a chunk over 3,000 cached
/// keys beside decode tokens, and a 32k-token prompt; each with whole tiles and with long
/// tiles split into pieces and merged. The output is poisoned with NaN first, so a row the
/// kernel skips fails.
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
            // (300, 40): over 256 keys, so the split path runs with group 7 and head size 64.
            seqs: vec![(0, 100), (130, 50), (7, 9), (300, 40)],
            host_ref: true,
        },
        AttCase {
            nh: 8,
            nkv: 1,
            hd: 80,
            // (400, 21): the split path with the padded head size 80.
            seqs: vec![(0, 200), (64, 33), (400, 21)],
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
            nh: 32,
            nkv: 8,
            hd: 128,
            seqs: vec![(3000, 200), (100, 1), (250, 1)],
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
    let (q_d, pos_d, seq_d, tab_d) = (
        upload(gpu, &qkv),
        upload(gpu, &positions),
        upload(gpu, &token_seq),
        upload(gpu, &tables),
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
    // Whole tiles, then every tile of more than 256 keys split into pieces (a target of far
    // more blocks than the step has), whose merge must give the same output.
    let forced = prefill::Split {
        nkv,
        target_blocks: 1 << 20,
        max_pieces: 4096,
    };
    let mut outputs = Vec::new();
    for split in [None, Some(forced)] {
        let max_pieces = split.map_or(0, |s| s.max_pieces);
        let (mut tiles, mut merges) = (
            vec![0u32; 4 * (t + max_pieces)],
            vec![0u32; (2 * max_pieces).max(4)],
        );
        let packed = prefill::pack_tiles(
            &query_start,
            &positions,
            k.tokens_per_tile(group),
            k.keys,
            split,
            &mut tiles,
            &mut merges,
        );
        assert_eq!(
            packed.merges > 0,
            split.is_some() && max_ctx > 256,
            "{what}: {packed:?}"
        );
        let tiles_d = upload(gpu, &tiles[..4 * packed.tiles]);
        let merges_d = upload(gpu, &merges[..(4 * packed.merges).max(1)]);
        let part = gpu
            .alloc((packed.tiles * nkv * k.piece_len() * 4).max(4))
            .unwrap();
        let fa = poisoned();
        let inputs = prefill::Inputs {
            qkv: q_d.ptr,
            ld,
            out: fa.ptr,
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
        prefill::launch(gpu, k, &inputs, nh, nkv, hd).unwrap();
        let label = if split.is_some() { "split" } else { "whole" };
        outputs.push((label, packed, read(&fa)));
    }
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
    for (label, packed, got) in &outputs {
        check_close(
            got,
            &want,
            &format!("{what}, {label} {packed:?} vs paged_attention"),
        );
    }
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
        for (label, packed, got) in &outputs {
            check_close(got, &host, &format!("{what}, {label} {packed:?} vs the host"));
        }
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
