//! Skinny GEMM for decode-sized batches: `y = x · Wᵀ` for up to [`SKINNY_MAX_M`] tokens on tensor
//! cores, streaming every weight byte once, with the step's next elementwise op fused into the
//! epilogue (store, residual add, SiLU·mul of gate and up, or, for q/k/v on decode steps, RoPE
//! and the K/V-cache write).
//!
//! At a handful of tokens the product is memory-bound: what matters is keeping enough bytes in
//! flight to saturate HBM, not the math. Each warp owns a tile of 16 weight rows and a share of
//! K; each lane loads 32 bytes of each of two rows per 64-wide K chunk (16-byte vectors, two
//! chunks in flight by default). The trick that makes plain vector loads valid `mma.m16n8k16`
//! fragments: lane (g = lane/4, t = lane%4) holds elements `8t..8t+8` and `32+8t..32+8t+8` of
//! each chunk, of weight rows g and g+8 and of token g, and both operands number K the same
//! (permuted) way, so the dot products are unchanged and neither operand goes through shared
//! memory. The four lanes of a row read 64 contiguous bytes per load: whole 32-byte sectors.
//! Warps then sum their partial tiles in shared memory and the epilogue writes the output.
//! A residual add with too few rows to fill the GPU may also cut K across `gridDim.y` blocks
//! that add their partial sums atomically; the order of those adds varies, so such a step's
//! output is not bitwise reproducible from run to run (last-bit differences).
//!
//! Weights never depend on the kernel before: each warp issues its first loads before
//! `pdl_wait` (programmatic dependent launch, kernels.rs), so a GEMM's blocks fetch weights in
//! the free slots while the kernels ahead of it drain, and HBM stays busy across launches.

use super::kernels::Module;

/// Most tokens the skinny GEMM takes (4 n-tiles of 8).
pub const SKINNY_MAX_M: usize = 32;
/// Token counts it is used for by default; cuBLAS above. On the H200, with programmatic
/// dependent launch and the first weight loads issued before the wait, the skinny GEMM streams
/// the 7B projections at 86% of copy bandwidth at one token against cuBLAS's 79%, and whole
/// decode steps ran 2–5% faster with it up to 8 tokens; at 16 its x fragments, re-read from L2
/// by every warp, make it lose (BENCHMARKS.md).
pub const SKINNY_DEFAULT_M: usize = 8;
/// Weight rows per block (one mma tile).
pub const SKINNY_ROWS: usize = 16;
/// Threads per block (`SK_WARPS * 32`).
pub const SKINNY_THREADS: u32 = 256;
/// The residual add of up to 8 tokens in 16-warp blocks, for adds with a norm output where K
/// would otherwise be split across blocks, and its threads per block (`SK_WIDE_WARPS * 32`).
pub const ADD_WIDE: &str = "skinny_add_8_w16";
pub const ADD_WIDE_THREADS: u32 = 512;

/// What the epilogue does with `acc = x · Wᵀ` (kernel name prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `y[m, n] = acc (+ bias)`, f32
    Store,
    /// `y[m, n] += acc (+ bias)`, f32: the residual stream
    Add,
    /// W is `[gate; up]` (2I rows): `y[m, j] = silu(gate_j) · up_j`, elem_t, `j < I`
    SiluMul,
}

/// Whether the skinny GEMM takes `m` tokens of an `n × k` weight (else cuBLAS does).
pub fn fits(skinny_max_m: usize, epi: Epilogue, n: usize, k: usize, m: usize) -> bool {
    m <= skinny_max_m && k.is_multiple_of(8) && (epi != Epilogue::SiluMul || n.is_multiple_of(2))
}

/// The RMSNorm split across a residual add and the next GEMM (`NormArgs` in the kernels): the
/// add writes `out = h · gamma` unscaled and each token's sum of squares into `out_ss` (zero
/// before the step); the next GEMM reads `out` as its x with `in_ss` and scales by 1/rms.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NormIo {
    /// The GEMM's x is unscaled: these per-token sums of squares give its 1/rms (0: x is final).
    pub in_ss: u64,
    pub eps: f32,
    /// Add: the next norm's weight, the unscaled output and its sums of squares (0: none).
    pub gamma: u64,
    pub out: u64,
    pub out_ss: u64,
}

impl NormIo {
    /// Neither end of a split norm: a plain GEMM.
    pub const NONE: NormIo = NormIo {
        in_ss: 0,
        eps: 0.0,
        gamma: 0,
        out: 0,
        out_ss: 0,
    };

    /// The kernel arguments after (x, W, bias, y, M, N, K, ldy).
    pub fn args(&self) -> [u64; NORM_ARGS] {
        [
            self.in_ss,
            self.eps.to_bits() as u64,
            self.gamma,
            self.out,
            self.out_ss,
        ]
    }
}

/// Kernel arguments of a [`NormIo`].
pub const NORM_ARGS: usize = 5;

/// Kernel name for an epilogue and a token count (rounded up to 8, 16 or 32).
pub fn kernel_name(epi: Epilogue, m: usize) -> &'static str {
    let names: [&'static str; 3] = match epi {
        Epilogue::Store => ["skinny_store_8", "skinny_store_16", "skinny_store_32"],
        Epilogue::Add => ["skinny_add_8", "skinny_add_16", "skinny_add_32"],
        Epilogue::SiluMul => ["skinny_silu_8", "skinny_silu_16", "skinny_silu_32"],
    };
    names[token_class(m)]
}

/// The q/k/v kernel with RoPE and the K/V cache write as its epilogue (`RopeArgs` in the
/// kernels), for `m` tokens (rounded up to 8, 16 or 32); its weight's heads need `hd % 16 == 0`.
pub fn rope_kernel_name(m: usize) -> &'static str {
    ["skinny_rope_8", "skinny_rope_16", "skinny_rope_32"][token_class(m)]
}

/// Which instantiation takes `m` tokens: 8, 16 or 32 of them (one, two or four n-tiles).
fn token_class(m: usize) -> usize {
    match m {
        0..=8 => 0,
        9..=16 => 1,
        _ => 2,
    }
}

pub const MODULE: Module = Module {
    name: "skinny",
    body: concat!(
        include_str!("kernels/skinny.cuh"),
        include_str!("kernels/skinny.cu")
    ),
    kernels: &[
        "skinny_store_8",
        "skinny_store_16",
        "skinny_store_32",
        "skinny_add_8",
        "skinny_add_16",
        "skinny_add_32",
        "skinny_add_8_w16",
        "skinny_silu_8",
        "skinny_silu_16",
        "skinny_silu_32",
        "skinny_rope_8",
        "skinny_rope_16",
        "skinny_rope_32",
    ],
};

/// Tuning variants of the Store kernel (up to 8 tokens), timed by `gpu_bench --micro` next to
/// the default (`skinny_store_8`). Not loaded by the backend.
pub const TUNING: Module = Module {
    name: "skinny-tuning",
    body: concat!(
        include_str!("kernels/skinny.cuh"),
        include_str!("kernels/skinny_tuning.cu")
    ),
    kernels: &[
        "skinny_var_u2_b4_nopl",
        "skinny_var_u2_b4_nopf",
        "skinny_var_u4_b2",
        "read_stream",
    ],
};
