//! Attention for prefill and mixed steps on tensor cores (`prefill_attention.cu`): which kernel
//! takes a head size, the query tiles a step is cut into (packed on the host with the step's
//! inputs), and the typed launch. Decode steps (one token a sequence) use `decode_attention`
//! (kernels.rs) instead; shapes this kernel does not take fall back to `paged_attention`.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::LaunchConfig;

use super::gpu::{cuda_err, Gpu, KernelArg};
use super::kernels::Module;
use crate::error::Result;

pub const MODULE: Module = Module {
    name: "prefill_attention",
    body: include_str!("prefill_attention.cu"),
    kernels: &[
        "prefill_attention_64_w4_m1_n64",
        "prefill_attention_128_w4_m2_n64",
    ],
};

/// One compiled variant of the kernel: the head dims it pads to, its warps, the 16-row query
/// tiles each warp takes, and the keys it stages in shared memory at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    pub name: &'static str,
    pub head_dim: usize,
    pub warps: usize,
    pub m_tiles: usize,
    pub keys: usize,
}

impl Kernel {
    /// Query rows of a block: (token, query head) pairs of one KV head's group.
    pub fn rows(&self) -> usize {
        16 * self.m_tiles * self.warps
    }

    /// Tokens of a tile for `group` query heads per KV head.
    pub fn tokens_per_tile(&self, group: usize) -> usize {
        self.rows() / group
    }

    /// Q for the block's rows, then two stages of K and V tiles.
    fn shared_bytes(&self) -> usize {
        (self.rows() + 4 * self.keys) * self.head_dim * 2
    }
}

const fn variant(name: &'static str, head_dim: usize, warps: usize, m_tiles: usize, keys: usize) -> Kernel {
    Kernel {
        name,
        head_dim,
        warps,
        m_tiles,
        keys,
    }
}

/// Every variant [`MODULE`] compiles (`gpu_bench --attention` times each). At head_dim 128 on
/// the H200, 4 warps of two row tiles with 64 keys a stage measured fastest of five variants
/// (BENCHMARKS.md, P3): 175-257 TFLOP/s against 142-197 for 8 warps of one row tile.
pub const VARIANTS: [Kernel; 2] = [
    variant("prefill_attention_64_w4_m1_n64", 64, 4, 1, 64),
    variant("prefill_attention_128_w4_m2_n64", 128, 4, 2, 64),
];

/// The kernel for `head_dim` with `group` query heads per KV head, if there is one: head_dim a
/// multiple of 8 up to 128 (rows are padded to 64 or 128 dims), and a group that fits a tile.
pub fn kernel(head_dim: usize, group: usize) -> Option<Kernel> {
    if head_dim == 0 || !head_dim.is_multiple_of(8) || group == 0 {
        return None;
    }
    let k = match head_dim {
        1..=64 => VARIANTS[0],
        65..=128 => VARIANTS[1],
        _ => return None,
    };
    (group <= k.rows()).then_some(k)
}

/// Lets every variant use the shared memory it needs (above the 48 KB a launch gets by default).
pub fn prepare(gpu: &Gpu) -> Result<()> {
    use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SMEM;
    for k in VARIANTS {
        gpu.func(k.name)
            .set_attribute(MAX_SMEM, k.shared_bytes() as i32)
            .map_err(|e| cuda_err(&format!("setting {}'s shared memory", k.name), e))?;
    }
    Ok(())
}

/// Cuts each sequence's query tokens (`query_start`, as in `StepBatch`) into tiles of at most
/// `per` tokens ([`Kernel::tokens_per_tile`]), written as `(first token, end token)` pairs into
/// `tiles` (room for one tile per token, so any step fits); returns their number. A sequence's
/// tiles go last first: the later a tile, the more keys it reads, so the longest blocks start
/// first.
pub fn pack_tiles(query_start: &[u32], per: usize, tiles: &mut [u32]) -> usize {
    let per = per as u32;
    let mut n = 0;
    for w in query_start.windows(2) {
        let (lo, hi) = (w[0], w[1]);
        let count = (hi - lo).div_ceil(per);
        for i in (0..count).rev() {
            let start = lo + i * per;
            tiles[2 * n..2 * n + 2].copy_from_slice(&[start, (start + per).min(hi)]);
            n += 1;
        }
    }
    n
}

/// The paged cache and step inputs the kernel reads (device pointers, u32 inputs).
#[derive(Debug, Clone, Copy)]
pub struct Inputs {
    /// `[T, ld]` f32, q rotated
    pub qkv: CUdeviceptr,
    pub ld: usize,
    /// `[T, nh * hd]` elem
    pub out: CUdeviceptr,
    /// `[slots, nkv * hd]` elem
    pub k_cache: CUdeviceptr,
    pub v_cache: CUdeviceptr,
    /// `[num_tiles, 2]` from [`pack_tiles`]
    pub tiles: CUdeviceptr,
    pub num_tiles: usize,
    /// `[T]`
    pub token_seq: CUdeviceptr,
    pub positions: CUdeviceptr,
    /// `[S, max_blocks]`
    pub block_tables: CUdeviceptr,
    pub max_blocks: usize,
    pub block_size: usize,
}

/// Launches prefill attention kernel `k` over `inp.num_tiles` tiles (packed for `k`).
pub fn launch(gpu: &Gpu, k: Kernel, inp: &Inputs, nh: usize, nkv: usize, hd: usize) -> Result<()> {
    assert!(
        hd <= k.head_dim && nh / nkv <= k.rows(),
        "{} for head_dim {hd}",
        k.name
    );
    let scale_log2 = std::f32::consts::LOG2_E / (hd as f32).sqrt();
    let args = [
        inp.qkv,
        (inp.ld as i32).bits(),
        inp.out,
        inp.k_cache,
        inp.v_cache,
        inp.tiles,
        inp.token_seq,
        inp.positions,
        inp.block_tables,
        (inp.max_blocks as i32).bits(),
        (inp.block_size as i32).bits(),
        (nh as i32).bits(),
        (nkv as i32).bits(),
        (hd as i32).bits(),
        scale_log2.bits(),
    ];
    let cfg = LaunchConfig {
        grid_dim: (inp.num_tiles as u32, nkv as u32, 1),
        block_dim: (32 * k.warps as u32, 1, 1),
        shared_mem_bytes: k.shared_bytes() as u32,
    };
    // SAFETY: every prefill_attention kernel takes (qkv, ld, out, k_cache, v_cache, tiles,
    // token_seq, positions, block_tables, max_blocks, block_size, nh, nkv, hd, scale_log2)
    // (prefill_attention.cu), in this order, with 32 * warps threads and its shared memory
    // (allowed by `prepare`); the caller's buffers have the shapes of `Inputs`.
    unsafe { gpu.launch(k.name, cfg, &args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_variants_match_the_compiled_kernels() {
        for k in VARIANTS {
            let def = format!(
                "FA_KERNEL({}, {}, {}, {})",
                k.head_dim, k.warps, k.m_tiles, k.keys
            );
            assert!(MODULE.body.contains(&def), "{} is not compiled ({def})", k.name);
            let name = format!(
                "prefill_attention_{}_w{}_m{}_n{}",
                k.head_dim, k.warps, k.m_tiles, k.keys
            );
            assert_eq!(k.name, name);
            assert!(MODULE.kernels.contains(&k.name), "{} is not loaded", k.name);
        }
        assert_eq!(MODULE.kernels.len(), VARIANTS.len());
    }

    fn tiles(query_start: &[u32], per: usize) -> Vec<(u32, u32)> {
        let t = *query_start.last().unwrap() as usize;
        let mut buf = vec![u32::MAX; 2 * t];
        let n = pack_tiles(query_start, per, &mut buf);
        buf[..2 * n].chunks(2).map(|c| (c[0], c[1])).collect()
    }

    #[test]
    fn tiles_cover_every_token_once_within_its_sequence() {
        // Sequences of 130, 1 (a decode token in a mixed step) and 64 tokens; tiles for GQA
        // groups 1..8 and 7 at 64 and 128 rows.
        let qs = [0u32, 130, 131, 195];
        for per in [64usize, 128, 32, 16, 9, 8, 1] {
            let got = tiles(&qs, per);
            let mut seen = [0u8; 195];
            for &(lo, hi) in &got {
                assert!(lo < hi && (hi - lo) as usize <= per, "per {per}: tile {lo}..{hi}");
                let seq = qs.partition_point(|&q| q <= lo) - 1;
                assert!(
                    hi <= qs[seq + 1],
                    "per {per}: tile {lo}..{hi} crosses a sequence end"
                );
                for t in lo..hi {
                    seen[t as usize] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "per {per}: every token in one tile");
            let want: usize = qs
                .windows(2)
                .map(|w| ((w[1] - w[0]) as usize).div_ceil(per))
                .sum();
            assert_eq!(got.len(), want, "per {per}: the fewest tiles");
        }
        // Last tile of a sequence first.
        assert_eq!(tiles(&[0, 130], 64), vec![(128, 130), (64, 128), (0, 64)]);
        assert_eq!(tiles(&[0, 3, 4], 8), vec![(0, 3), (3, 4)]);
    }

    #[test]
    fn head_sizes_and_groups_it_takes() {
        let name = |hd, group| kernel(hd, group).map(|k| k.name);
        assert_eq!(name(128, 1), Some(VARIANTS[1].name));
        assert_eq!(name(80, 7), Some(VARIANTS[1].name));
        assert_eq!(name(64, 8), Some(VARIANTS[0].name));
        assert_eq!(name(16, 2), Some(VARIANTS[0].name));
        let k = kernel(128, 7).unwrap();
        assert_eq!(k.tokens_per_tile(7), k.rows() / 7);
        for (hd, group) in [(256, 1), (12, 1), (0, 1), (128, 0), (64, 65)] {
            assert_eq!(kernel(hd, group), None, "hd {hd}, group {group}");
        }
    }
}
