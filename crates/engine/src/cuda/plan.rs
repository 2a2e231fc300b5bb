//! The step plan: how each part of a decoder layer runs for one step, decided before anything is
//! recorded. From the model's sizes ([`ModelConfig`]), the step's shape ([`StepShape`]: tokens,
//! sequences, LoRA groups in use) and the device ([`Caps`]), [`StepPlan::new`] picks every kernel
//! and fusion; `CudaModel::record_forward` walks the plan and only binds buffers. Pure: built and
//! tested without a GPU.
//!
//! The fusions, and what allows each (the tests below hold these rules):
//! - **RoPE in the q/k/v GEMM** ([`Qkv::FusedRope`]): a decode step on the skinny GEMM, no q/k/v
//!   LoRA, no q/k norms, head_dim a multiple of 16.
//! - **A LoRA expand inside the next kernel** ([`QkvLora::ExpandInRope`], [`AddLora::ExpandInNorm`]):
//!   decode steps only (one token a sequence: the BGMV layout those kernels read); the q/k/v
//!   expand not with q/k norms (they must see the adapted q and k).
//! - **RMSNorms split across the GEMMs around them** ([`StepPlan::split_norms`]): bf16 decode steps
//!   of at most [`NORM_SPLIT_MAX_TOKENS`] tokens, no LoRA, every projection on the skinny GEMM.
//! - **SiLU·mul in the gate/up GEMM** ([`Mlp::FusedSilu`]): no gate/up LoRA (its expand must land
//!   before the activation).
//! - **SGMV** rather than BGMV for LoRA: prefill and mixed steps of [`SGMV_MIN_TOKENS`] or more.

use super::elem::Elem;
use super::kernels::{DECODE_ATT_MAX_PARTS, SHRINK_WIDE_MIN_TOKENS};
use super::model::StepShape;
use super::skinny::{self, Epilogue, ADD_WIDE, ADD_WIDE_THREADS, SKINNY_ROWS, SKINNY_THREADS};
use crate::models::spec::ProjGroup;
use crate::ModelConfig;

/// Most tokens of a step whose RMSNorms are split across GEMMs: the one-n-tile skinny kernels.
pub const NORM_SPLIT_MAX_TOKENS: usize = 8;

/// Token counts from which prefill/mixed steps use SGMV rather than per-token BGMV. On the H200
/// (Llama-2-7B shape, 32 distinct rank-16 adapters on q,k,v,o) SGMV cost +12.3 ms over no-LoRA
/// at 32 × 128 tokens against BGMV's +22.7 ms, but +3.3 ms against +1.2 ms at 128 tokens
/// (BENCHMARKS.md); the crossover between those two points was not measured.
pub const SGMV_MIN_TOKENS: usize = 512;

/// Whether LoRA group `g` runs in a step: bit `g` of [`StepShape::lora_mask`].
fn lora_on(shape: &StepShape, g: ProjGroup) -> bool {
    shape.lora_mask & (1 << g as u8) != 0
}

/// What the device offers the plan.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub elem: Elem,
    /// Largest token count the skinny GEMM takes (cuBLAS above).
    pub skinny_max_m: usize,
    pub num_sms: usize,
    /// Whether the tensor-core prefill attention takes this model's heads.
    pub prefill_attention: bool,
}

/// How `y = x · Wᵀ` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gemm {
    /// Our skinny tensor-core GEMM, its epilogue fused: `blocks × split_k` blocks of `threads`.
    Skinny {
        kernel: &'static str,
        threads: u32,
        blocks: u32,
        split_k: u32,
    },
    /// cuBLAS, then `add_bias` and, for [`Epilogue::SiluMul`], `silu_mul` through a scratch buffer.
    Cublas,
}

impl Gemm {
    /// The GEMM for `m` tokens of an `n × k` weight with epilogue `epi`; `norm_out`: the add
    /// writes the next RMSNorm's unscaled output (a split norm), which needs a tile's sum in one
    /// block.
    pub fn new(caps: &Caps, epi: Epilogue, n: usize, k: usize, m: usize, norm_out: bool) -> Gemm {
        if !skinny::fits(caps.skinny_max_m, epi, n, k, m) {
            return Gemm::Cublas;
        }
        let (rows, per_block) = match epi {
            Epilogue::SiluMul => (n / 2, SKINNY_ROWS / 2),
            _ => (n, SKINNY_ROWS),
        };
        let blocks = rows.div_ceil(per_block);
        // A residual add with few rows and a long K (o_proj, down_proj at one token: 256 blocks
        // where an SM holds four) cuts K into shares of at least 32 chunks, added atomically
        // (on the H200: o_proj 71% → 80% and down_proj 81% → 93% of copy bandwidth).
        let split = match epi {
            Epilogue::Add if m <= 8 && blocks < 4 * caps.num_sms => (k.div_ceil(64) / 32).clamp(1, 4),
            _ => 1,
        };
        // With a norm output, a tile's sum stays in one block: 16 warps where K would be split.
        let (kernel, split_k, threads) = match (split, norm_out) {
            (1, _) => (skinny::kernel_name(epi, m), 1, SKINNY_THREADS),
            (_, false) => (skinny::kernel_name(epi, m), split, SKINNY_THREADS),
            _ => (ADD_WIDE, 1, ADD_WIDE_THREADS),
        };
        Gemm::Skinny {
            kernel,
            threads,
            blocks: blocks as u32,
            split_k: split_k as u32,
        }
    }

    pub fn is_skinny(&self) -> bool {
        matches!(self, Gemm::Skinny { .. })
    }
}

/// A LoRA group's shrink and expand, both in their own kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraRun {
    /// A token at a time (`lora_shrink`, or `lora_shrink_wide` above [`SHRINK_WIDE_MIN_TOKENS`]
    /// tokens; `lora_expand`).
    Bgmv { wide_shrink: bool },
    /// Runs of tokens with one adapter (`sgmv_shrink`, `sgmv_expand`): prefill and mixed steps.
    Sgmv,
}

impl LoraRun {
    fn new(shape: &StepShape) -> LoraRun {
        if uses_sgmv(shape.num_tokens, shape.num_seqs) {
            LoraRun::Sgmv
        } else {
            LoraRun::Bgmv {
                wide_shrink: shape.num_tokens > SHRINK_WIDE_MIN_TOKENS,
            }
        }
    }
}

/// Whether a step of `t` tokens over `s` sequences runs its LoRA as SGMV (its segments packed
/// with its inputs) rather than BGMV.
pub fn uses_sgmv(t: usize, s: usize) -> bool {
    t > s && t >= SGMV_MIN_TOKENS
}

/// A BGMV shrink whose expand a later kernel does (decode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shrink {
    pub wide: bool,
}

/// q/k/v: the GEMM, its LoRA, Qwen3's q/k norms, RoPE and the K/V cache write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qkv {
    /// Decode: RoPE and the cache write in the skinny GEMM's epilogue (`skinny_rope_*`), one
    /// block a 16-row tile.
    FusedRope { kernel: &'static str, blocks: u32 },
    /// The GEMM into `qkv`, its LoRA, the q/k norms (`qk_norm`), then RoPE.
    Gemm {
        gemm: Gemm,
        lora: QkvLora,
        qk_norm: bool,
        rope: Rope,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLora {
    None,
    Run(LoraRun),
    /// Decode without q/k norms: the shrink here, the expand inside `rope_kv_write`.
    ExpandInRope(Shrink),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rope {
    /// `rope_kv_write_rows`: a 256-thread block a token (prefill; a block a head is 64 threads
    /// at head_dim 128, 0.95 ms a layer for 8,192 tokens on the H200).
    Rows,
    /// `rope_kv_write`: a block a (token, head), which can add a fused q/k/v LoRA expand.
    PerHead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// One token a sequence: `decode_attention` over `parts` context splits a (sequence, head),
    /// or with `wide` (few pairs) `decode_attention_wide`, one 1024-thread block each.
    Decode { parts: u32, wide: bool },
    /// `prefill_attention` on tensor cores over the step's packed tiles.
    Prefill,
    /// `paged_attention`: head sizes the others do not take.
    Paged,
}

/// o_proj or down_proj: a GEMM adding into the residual stream, its LoRA, and the RMSNorm that
/// follows it (post-attention, or the next layer's input norm / the final norm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddProj {
    pub gemm: Gemm,
    pub lora: AddLora,
    pub norm: NormAfter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddLora {
    None,
    /// The expand adds into the residual stream after the GEMM.
    Run(LoraRun),
    /// Decode: the shrink here, the expand inside the `add_rms_norm` after.
    ExpandInNorm(Shrink),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormAfter {
    /// The add wrote `h · gamma` and the sums of squares; the next GEMM scales (split norm).
    Split,
    /// `add_rms_norm` over the step's rows, `threads` a row.
    Kernel { threads: u32 },
}

/// gate/up, SiLU·mul.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mlp {
    /// SiLU·mul in the GEMM's epilogue (skinny), or through scratch (cuBLAS).
    FusedSilu(Gemm),
    /// gate/up into scratch, the LoRA added there, then `silu_mul`.
    ThenSilu { gemm: Gemm, lora: LoraRun },
}

/// One decoder layer. Every layer of a step runs the same plan (the model's layers share their
/// shapes); where a split norm's sums live depends on the layer index, which the recorder adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerPlan {
    pub qkv: Qkv,
    pub attention: Attention,
    pub o: AddProj,
    pub mlp: Mlp,
    pub down: AddProj,
}

/// One step's kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    /// Every RMSNorm after embed's is split across the GEMMs around it: embed zeroes the sums of
    /// squares, each add writes one, each GEMM after reads one. Then the last down_proj leaves
    /// every token's final norm unscaled in `normed` and lm_head scales it.
    pub split_norms: bool,
    pub layer: LayerPlan,
    /// Without split norms: `add_rms_norm` of each sequence's last row, `threads` a row.
    pub last_norm_threads: u32,
    pub lm_head: Gemm,
}

/// Threads an `add_rms_norm` row gets over `rows` rows of `hidden`: up to 1024 for the few rows
/// of a decode step, 256 (more rows resident an SM, a cheaper block sum) once the rows fill the
/// GPU several times over.
pub fn norm_threads(caps: &Caps, hidden: usize, rows: usize) -> u32 {
    if rows >= 4 * caps.num_sms {
        256
    } else {
        (hidden.div_ceil(32) * 32).min(1024) as u32
    }
}

/// Whether `decode_attention` takes a head size: a power-of-two number of 8-element chunks, at
/// most 32.
pub fn decode_attention_fits(hd: usize) -> bool {
    hd.is_multiple_of(8) && (hd / 8).is_power_of_two() && hd / 8 <= 32
}

impl StepPlan {
    pub fn new(c: &ModelConfig, caps: &Caps, shape: &StepShape) -> StepPlan {
        let (t, s) = (shape.num_tokens, shape.num_seqs);
        let (h, hd, nh) = (c.hidden_size, c.head_dim, c.num_attention_heads);
        let (qkv_n, inter) = (c.q_size() + 2 * c.kv_size(), c.intermediate_size);
        let decode = t == s;
        let on = |g: ProjGroup| lora_on(shape, g);
        let fits = |epi, n, k| skinny::fits(caps.skinny_max_m, epi, n, k, t);
        let split_norms = caps.elem == Elem::Bf16
            && c.num_hidden_layers > 0
            && decode
            && t <= NORM_SPLIT_MAX_TOKENS
            && shape.lora_mask == 0
            && skinny::fits(caps.skinny_max_m, Epilogue::Store, c.vocab_size, h, t)
            && fits(Epilogue::Store, qkv_n, h)
            && fits(Epilogue::Add, h, c.q_size())
            && fits(Epilogue::SiluMul, 2 * inter, h)
            && fits(Epilogue::Add, h, inter);
        let shrink = Shrink {
            wide: t > SHRINK_WIDE_MIN_TOKENS,
        };
        let run = LoraRun::new(shape);

        let qkv =
            if decode && !on(ProjGroup::Qkv) && !c.qk_norm && fits(Epilogue::Store, qkv_n, h) && hd % 16 == 0
            {
                Qkv::FusedRope {
                    kernel: skinny::rope_kernel_name(t),
                    blocks: (qkv_n / SKINNY_ROWS) as u32,
                }
            } else {
                let lora = match on(ProjGroup::Qkv) {
                    false => QkvLora::None,
                    true if decode && !c.qk_norm => QkvLora::ExpandInRope(shrink),
                    true => QkvLora::Run(run),
                };
                Qkv::Gemm {
                    gemm: Gemm::new(caps, Epilogue::Store, qkv_n, h, t, false),
                    lora,
                    qk_norm: c.qk_norm,
                    rope: match lora {
                        QkvLora::ExpandInRope(_) => Rope::PerHead,
                        _ if t > s => Rope::Rows,
                        _ => Rope::PerHead,
                    },
                }
            };

        // Decode steps split each (sequence, head)'s context over enough blocks to fill the GPU:
        // about four 128-thread blocks an SM, or with the 1024-thread kernel (few pairs) at most
        // one, so that a long context stays in one wave of those.
        let attention = if decode && decode_attention_fits(hd) {
            let wide = 2 * s * nh <= caps.num_sms;
            let parts = match wide {
                true => caps.num_sms / (s * nh),
                false => (4 * caps.num_sms).div_ceil(s * nh),
            };
            Attention::Decode {
                parts: parts.clamp(1, DECODE_ATT_MAX_PARTS) as u32,
                wide,
            }
        } else if caps.prefill_attention && shape.att_tiles.tiles > 0 {
            Attention::Prefill
        } else {
            Attention::Paged
        };

        let norm = match split_norms {
            true => NormAfter::Split,
            false => NormAfter::Kernel {
                threads: norm_threads(caps, h, t),
            },
        };
        let add_proj = |g: ProjGroup, k: usize| AddProj {
            gemm: Gemm::new(caps, Epilogue::Add, h, k, t, split_norms),
            lora: match on(g) {
                false => AddLora::None,
                true if decode => AddLora::ExpandInNorm(shrink),
                true => AddLora::Run(run),
            },
            norm,
        };
        let mlp = match on(ProjGroup::GateUp) {
            true => Mlp::ThenSilu {
                gemm: Gemm::new(caps, Epilogue::Store, 2 * inter, h, t, false),
                lora: run,
            },
            false => Mlp::FusedSilu(Gemm::new(caps, Epilogue::SiluMul, 2 * inter, h, t, false)),
        };
        StepPlan {
            split_norms,
            layer: LayerPlan {
                qkv,
                attention,
                o: add_proj(ProjGroup::O, c.q_size()),
                mlp,
                down: add_proj(ProjGroup::Down, inter),
            },
            last_norm_threads: norm_threads(caps, h, s),
            lm_head: Gemm::new(caps, Epilogue::Store, c.vocab_size, h, s, false),
        }
    }

    /// Every GEMM of a layer and lm_head, for checks over all of them.
    pub fn gemms(&self) -> impl Iterator<Item = Gemm> {
        let l = &self.layer;
        let qkv = match l.qkv {
            Qkv::FusedRope { .. } => None,
            Qkv::Gemm { gemm, .. } => Some(gemm),
        };
        let mlp = match l.mlp {
            Mlp::FusedSilu(g) | Mlp::ThenSilu { gemm: g, .. } => g,
        };
        qkv.into_iter().chain([l.o.gemm, mlp, l.down.gemm, self.lm_head])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::prefill::Packed;

    /// Llama-2-7B's shape (bench/llama-2-7b).
    fn llama() -> ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/llama-2-7b");
        ModelConfig::from_dir(&dir).expect("bench/llama-2-7b/config.json")
    }

    const H200: Caps = Caps {
        elem: Elem::Bf16,
        skinny_max_m: 8,
        num_sms: 132,
        prefill_attention: true,
    };

    fn shape(t: usize, s: usize, lora_mask: u8) -> StepShape {
        StepShape {
            num_tokens: t,
            num_seqs: s,
            lora_mask,
            num_lora_segments: 0,
            att_tiles: Packed {
                tiles: usize::from(t > s),
                merges: 0,
            },
        }
    }

    fn plan(t: usize, s: usize, mask: u8) -> StepPlan {
        StepPlan::new(&llama(), &H200, &shape(t, s, mask))
    }

    const ALL: u8 = 0b1111;

    #[test]
    fn a_small_decode_step_without_lora_fuses_everything() {
        let p = plan(1, 1, 0);
        assert!(p.split_norms);
        assert!(matches!(
            p.layer.qkv,
            Qkv::FusedRope {
                kernel: "skinny_rope_8",
                ..
            }
        ));
        assert!(matches!(p.layer.mlp, Mlp::FusedSilu(Gemm::Skinny { .. })));
        assert_eq!(p.layer.o.norm, NormAfter::Split);
        assert!(p.gemms().all(|g| g.is_skinny()));
        // 32 (sequence, head) pairs: the wide kernel, 4 context parts each.
        assert_eq!(p.layer.attention, Attention::Decode { parts: 4, wide: true });
    }

    #[test]
    fn split_norms_need_bf16_decode_few_tokens_no_lora_and_skinny_gemms() {
        assert!(plan(8, 8, 0).split_norms);
        assert!(
            !plan(8, 8, 0b0010).split_norms,
            "LoRA kernels read a whole normed x"
        );
        assert!(
            !plan(9, 9, 0).split_norms,
            "more tokens than the one-n-tile kernels"
        );
        assert!(!plan(64, 1, 0).split_norms, "prefill");
        let f16 = Caps {
            elem: Elem::F16,
            ..H200
        };
        assert!(!StepPlan::new(&llama(), &f16, &shape(1, 1, 0)).split_norms);
        let cublas = Caps {
            skinny_max_m: 0,
            ..H200
        };
        assert!(!StepPlan::new(&llama(), &cublas, &shape(1, 1, 0)).split_norms);
        // Whenever norms are split, every GEMM is skinny (the split norm lives in its epilogue)
        // and every add's norm is split.
        for t in 1..=40 {
            for mask in [0, 1, 2, ALL] {
                for caps in [H200, f16, cublas] {
                    let p = StepPlan::new(&llama(), &caps, &shape(t, t, mask));
                    if p.split_norms {
                        assert!(p.gemms().all(|g| g.is_skinny()), "t {t}: {p:?}");
                        assert_eq!(p.layer.o.norm, NormAfter::Split);
                        assert_eq!(p.layer.down.norm, NormAfter::Split);
                        assert_eq!(p.layer.o.lora, AddLora::None);
                    } else {
                        assert!(matches!(p.layer.down.norm, NormAfter::Kernel { .. }));
                    }
                }
            }
        }
    }

    #[test]
    fn lora_expands_fuse_into_the_next_kernel_only_in_decode() {
        let d = plan(4, 4, ALL);
        assert!(matches!(
            d.layer.qkv,
            Qkv::Gemm {
                lora: QkvLora::ExpandInRope(_),
                rope: Rope::PerHead,
                ..
            }
        ));
        assert!(matches!(d.layer.o.lora, AddLora::ExpandInNorm(_)));
        assert!(matches!(d.layer.down.lora, AddLora::ExpandInNorm(_)));
        assert!(
            matches!(d.layer.o.norm, NormAfter::Kernel { .. }),
            "the expand needs the norm kernel"
        );
        // gate/up's expand must land before the activation: never fused.
        assert!(matches!(
            d.layer.mlp,
            Mlp::ThenSilu {
                lora: LoraRun::Bgmv { .. },
                ..
            }
        ));
        // Prefill: each expand in its own kernel, SGMV from 512 tokens.
        for (t, s, want) in [
            (100, 2, LoraRun::Bgmv { wide_shrink: true }),
            (40, 2, LoraRun::Bgmv { wide_shrink: false }),
            (4096, 32, LoraRun::Sgmv),
        ] {
            let p = plan(t, s, ALL);
            assert_eq!(p.layer.o.lora, AddLora::Run(want));
            assert_eq!(p.layer.down.lora, AddLora::Run(want));
            assert!(
                matches!(p.layer.qkv, Qkv::Gemm { lora: QkvLora::Run(r), rope: Rope::Rows, .. } if r == want)
            );
            assert!(matches!(p.layer.mlp, Mlp::ThenSilu { lora, .. } if lora == want));
        }
        // With q/k norms the q/k/v expand lands before them, and RoPE cannot be the GEMM's.
        let qwen3 = ModelConfig {
            qk_norm: true,
            ..llama()
        };
        let p = StepPlan::new(&qwen3, &H200, &shape(2, 2, ALL));
        assert!(matches!(
            p.layer.qkv,
            Qkv::Gemm {
                lora: QkvLora::Run(_),
                qk_norm: true,
                ..
            }
        ));
        let p = StepPlan::new(&qwen3, &H200, &shape(2, 2, 0));
        assert!(matches!(
            p.layer.qkv,
            Qkv::Gemm {
                lora: QkvLora::None,
                qk_norm: true,
                rope: Rope::PerHead,
                ..
            }
        ));
    }

    #[test]
    fn rope_fuses_into_the_gemm_only_where_the_skinny_kernel_takes_whole_heads() {
        assert!(matches!(plan(8, 8, 0).layer.qkv, Qkv::FusedRope { .. }));
        assert!(matches!(
            plan(16, 16, 0).layer.qkv,
            Qkv::Gemm {
                gemm: Gemm::Cublas,
                ..
            }
        ));
        assert!(matches!(plan(8, 8, 0b0001).layer.qkv, Qkv::Gemm { .. }));
        // The epilogue rotates whole 16-row tiles of a head.
        let hd72 = ModelConfig {
            head_dim: 72,
            ..llama()
        };
        assert!(matches!(
            StepPlan::new(&hd72, &H200, &shape(1, 1, 0)).layer.qkv,
            Qkv::Gemm {
                rope: Rope::PerHead,
                ..
            }
        ));
    }

    #[test]
    fn attention_by_step_kind_and_head_size() {
        // Few (sequence, head) pairs: the wide kernel, the SMs shared among them.
        assert_eq!(
            plan(1, 1, 0).layer.attention,
            Attention::Decode { parts: 4, wide: true }
        );
        let small = ModelConfig {
            num_attention_heads: 4,
            num_key_value_heads: 4,
            ..llama()
        };
        let p = StepPlan::new(&small, &H200, &shape(2, 2, 0));
        assert_eq!(
            p.layer.attention,
            Attention::Decode {
                parts: 16,
                wide: true
            }
        );
        // More: 128-thread blocks, about four an SM.
        assert_eq!(
            plan(4, 4, 0).layer.attention,
            Attention::Decode {
                parts: 5,
                wide: false
            }
        );
        assert_eq!(
            plan(256, 256, 0).layer.attention,
            Attention::Decode {
                parts: 1,
                wide: false
            }
        );
        assert_eq!(plan(300, 2, 0).layer.attention, Attention::Prefill);
        let hd80 = ModelConfig {
            head_dim: 80,
            ..llama()
        };
        // head_dim 80: not decode_attention's; prefill_attention pads it.
        assert_eq!(
            StepPlan::new(&hd80, &H200, &shape(3, 3, 0)).layer.attention,
            Attention::Paged
        );
        let no_fa = Caps {
            prefill_attention: false,
            ..H200
        };
        assert_eq!(
            StepPlan::new(&llama(), &no_fa, &shape(300, 2, 0)).layer.attention,
            Attention::Paged
        );
    }

    #[test]
    fn residual_adds_split_k_at_one_token_but_not_with_a_norm_output() {
        // down_proj at one token: K = 11008 in 4 shares; with the split norm out, 16 warps instead.
        let gemm = |norm_out| Gemm::new(&H200, Epilogue::Add, 4096, 11008, 1, norm_out);
        assert!(matches!(
            gemm(false),
            Gemm::Skinny {
                split_k: 4,
                threads: SKINNY_THREADS,
                ..
            }
        ));
        assert!(matches!(
            gemm(true),
            Gemm::Skinny {
                kernel: ADD_WIDE,
                split_k: 1,
                threads: ADD_WIDE_THREADS,
                ..
            }
        ));
        // Stores and SiLU never split K; gate/up's blocks cover I rows (gate and up in one).
        assert!(matches!(
            Gemm::new(&H200, Epilogue::SiluMul, 22016, 4096, 1, false),
            Gemm::Skinny {
                split_k: 1,
                blocks: 1376,
                ..
            }
        ));
        assert_eq!(
            Gemm::new(&H200, Epilogue::Store, 4096, 4096, 9, false),
            Gemm::Cublas
        );
    }

    #[test]
    fn norm_threads_by_rows() {
        assert_eq!(plan(1, 1, 1).layer.o.norm, NormAfter::Kernel { threads: 1024 });
        assert_eq!(plan(4096, 32, 0).layer.o.norm, NormAfter::Kernel { threads: 256 });
        assert_eq!(plan(4096, 32, 0).last_norm_threads, 1024);
    }
}
