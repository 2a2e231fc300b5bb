//! Attention for prefill and mixed steps on tensor cores (`prefill_attention.cu`): which kernel
//! takes a head size, the query tiles a step is cut into (packed on the host with the step's
//! inputs), and the typed launch. Decode steps (one token a sequence) use `decode_attention`
//! (kernels.rs) instead; shapes this kernel does not take fall back to `paged_attention`.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::LaunchConfig;

use super::gpu::{cuda_err, Gpu};
use super::kernels::Module;
use super::launch;
use crate::error::Result;

pub const MODULE: Module = Module {
    name: "prefill_attention",
    body: include_str!("kernels/prefill_attention.cu"),
    kernels: &[
        "prefill_attention_64_w4_m1_n64",
        "prefill_attention_128_w4_m2_n64",
        "prefill_attention_merge",
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

    /// f32 elements of one piece's slot of the split-context buffer: O `[rows, head_dim]`, then
    /// the rows' max and sum.
    pub fn piece_len(&self) -> usize {
        self.rows() * (self.head_dim + 2)
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

/// Fewest keys a piece of a split tile takes: a shorter piece costs more in its merge than it
/// saves.
pub const MIN_PIECE_KEYS: usize = 256;

/// When [`pack_tiles`] splits a tile's keys into pieces: a step whose tiles are few and long (a
/// chunk of a long prompt: two tiles a KV head over 8k cached keys are 64 blocks for 132 SMs, each
/// a long serial loop) is cut so that no block does much more than its share of the step.
#[derive(Debug, Clone, Copy)]
pub struct Split {
    pub nkv: usize,
    /// Blocks that run at once (two an SM at head_dim 128).
    pub target_blocks: usize,
    /// Piece rows the split-context buffer has slots for (`slots / nkv`).
    pub max_pieces: usize,
}

/// What [`pack_tiles`] wrote: rows of `tiles` (pieces first) and of `merges`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Packed {
    pub tiles: usize,
    pub merges: usize,
}

/// Marks a tile row that is no piece: the whole causal range, normalized into the output.
pub const WHOLE: u32 = u32::MAX;

/// Each sequence's query tokens (`query_start`, as in `StepBatch`) in tiles of at most `per`
/// tokens ([`Kernel::tokens_per_tile`]), last tile first (the later a tile, the more keys it
/// reads: the longest blocks start first). `positions`: each token's.
fn base_tiles<'a>(
    query_start: &'a [u32],
    positions: &'a [u32],
    per: usize,
) -> impl Iterator<Item = (u32, u32, usize)> + 'a {
    let per = per as u32;
    query_start.windows(2).flat_map(move |w| {
        let (lo, hi) = (w[0], w[1]);
        (0..(hi - lo).div_ceil(per)).rev().map(move |i| {
            let start = lo + i * per;
            let end = (start + per).min(hi);
            (start, end, positions[end as usize - 1] as usize + 1)
        })
    })
}

/// Packs a step's attention tiles of `per` tokens ([`Kernel::tokens_per_tile`]) for a kernel
/// staging `keys` keys at a time ([`Kernel::keys`]): rows `(first token, end token, key_lo,
/// key_hi)` into `tiles` and, for tiles cut into pieces (`split`, see [`Split`]), rows `(first
/// token, end token, first piece row, pieces)` into `merges`. Pieces come first (their row is
/// their slot of the split-context buffer), each `key_lo..key_hi` a run of whole `k.keys` key
/// tiles, the last ending at the tile's last position + 1; other rows have key_hi [`WHOLE`].
/// `tiles` needs room for `4 · (tokens + max_pieces)`, `merges` for `2 · max_pieces`.
pub fn pack_tiles(
    query_start: &[u32],
    positions: &[u32],
    per: usize,
    keys: usize,
    split: Option<Split>,
    tiles: &mut [u32],
    merges: &mut [u32],
) -> Packed {
    let key_tiles = |n: usize| n.div_ceil(keys);
    // Key tiles a piece takes: a block's share of the step's work (so a tile longer than that
    // is cut), at least MIN_PIECE_KEYS; doubled until the pieces fit the buffer. usize::MAX: no
    // split. A step of many tiles has a share longer than any tile and splits nothing.
    let piece_kt = split.map_or(usize::MAX, |sp| {
        let work: usize = base_tiles(query_start, positions, per)
            .map(|(_, _, keys)| key_tiles(keys))
            .sum();
        let mut kt = (work * sp.nkv)
            .div_ceil(sp.target_blocks.max(1))
            .max(MIN_PIECE_KEYS.div_ceil(keys));
        loop {
            let pieces: usize = base_tiles(query_start, positions, per)
                .map(|(_, _, keys)| key_tiles(keys))
                .filter(|&t| t > kt)
                .map(|t| t.div_ceil(kt))
                .sum();
            if pieces <= sp.max_pieces {
                return kt;
            }
            kt *= 2;
        }
    });
    let (mut row, mut merge) = (0, 0);
    let put = |tiles: &mut [u32], r: &mut usize, v: [u32; 4]| {
        tiles[4 * *r..4 * *r + 4].copy_from_slice(&v);
        *r += 1;
    };
    for (lo, hi, end) in base_tiles(query_start, positions, per) {
        let kt = key_tiles(end);
        if kt <= piece_kt {
            continue;
        }
        // np pieces of (nearly) equal length.
        let np = kt.div_ceil(piece_kt);
        let each = kt.div_ceil(np);
        merges[4 * merge..4 * merge + 4].copy_from_slice(&[lo, hi, row as u32, np as u32]);
        merge += 1;
        for p in 0..np {
            let key_lo = p * each * keys;
            let key_hi = ((p + 1) * each * keys).min(end);
            put(tiles, &mut row, [lo, hi, key_lo as u32, key_hi as u32]);
        }
    }
    for (lo, hi, end) in base_tiles(query_start, positions, per) {
        if key_tiles(end) <= piece_kt {
            put(tiles, &mut row, [lo, hi, 0, WHOLE]);
        }
    }
    Packed {
        tiles: row,
        merges: merge,
    }
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
    /// `[packed.tiles, 4]` and `[packed.merges, 4]` from [`pack_tiles`]
    pub tiles: CUdeviceptr,
    pub merges: CUdeviceptr,
    pub packed: Packed,
    /// The split-context buffer: `[pieces * nkv, Kernel::piece_len]` f32 (0 when nothing splits)
    pub part: CUdeviceptr,
    /// `[T]`
    pub token_seq: CUdeviceptr,
    pub positions: CUdeviceptr,
    /// `[S, max_blocks]`
    pub block_tables: CUdeviceptr,
    pub max_blocks: usize,
    pub block_size: usize,
}

/// Launches prefill attention kernel `k` over the tiles packed for it, then the merge of
/// split tiles' pieces if there are any.
pub fn launch(gpu: &Gpu, k: Kernel, inp: &Inputs, nh: usize, nkv: usize, hd: usize) -> Result<()> {
    assert!(
        hd <= k.head_dim && nh / nkv <= k.rows(),
        "{} for head_dim {hd}",
        k.name
    );
    assert!(
        inp.packed.merges == 0 || inp.part != 0,
        "split tiles need a buffer"
    );
    let scale_log2 = std::f32::consts::LOG2_E / (hd as f32).sqrt();
    let [ld, max_blocks, block_size, nh, nkv32, hd] =
        [inp.ld, inp.max_blocks, inp.block_size, nh, nkv, hd].map(|v| v as i32);
    let cfg = LaunchConfig {
        grid_dim: (inp.packed.tiles as u32, nkv as u32, 1),
        block_dim: (32 * k.warps as u32, 1, 1),
        shared_mem_bytes: k.shared_bytes() as u32,
    };
    // SAFETY: kernel k's threads and shared memory (allowed by `prepare`); the caller's buffers
    // have the shapes of `Inputs`, the tiles were packed for k.
    unsafe {
        launch::prefill_attention(
            gpu,
            k.name,
            cfg,
            inp.qkv,
            ld,
            inp.out,
            inp.k_cache,
            inp.v_cache,
            inp.tiles,
            inp.token_seq,
            inp.positions,
            inp.block_tables,
            max_blocks,
            block_size,
            nh,
            nkv32,
            hd,
            scale_log2,
            inp.part,
        )
    }?;
    if inp.packed.merges == 0 {
        return Ok(());
    }
    let [rows, hd_pad] = [k.rows(), k.head_dim].map(|v| v as i32);
    let grid = (inp.packed.merges as u32, nkv as u32, 1);
    // SAFETY: `part` holds the pieces the launch above wrote for kernel k, `merges` lists them.
    unsafe {
        launch::prefill_attention_merge(
            gpu,
            super::gpu::cfg(grid, 128),
            inp.part,
            inp.merges,
            inp.out,
            nh,
            nkv32,
            hd,
            rows,
            hd_pad,
        )
    }
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
        // The variants and the merge of split tiles.
        assert_eq!(MODULE.kernels.len(), VARIANTS.len() + 1);
    }

    /// Query starts and positions of sequences given as (cached context, query tokens).
    fn step(seqs: &[(u32, u32)]) -> (Vec<u32>, Vec<u32>) {
        let (mut qs, mut pos) = (vec![0u32], Vec::new());
        for &(past, q) in seqs {
            pos.extend(past..past + q);
            qs.push(pos.len() as u32);
        }
        (qs, pos)
    }

    type Rows = (Vec<[u32; 4]>, Vec<[u32; 4]>);

    fn pack(seqs: &[(u32, u32)], per: usize, split: Option<Split>) -> Rows {
        let (qs, pos) = step(seqs);
        let t = pos.len();
        let max_pieces = split.map_or(0, |s| s.max_pieces);
        let mut tiles = vec![7u32; 4 * (t + max_pieces)];
        let mut merges = vec![7u32; 2 * max_pieces];
        let n = pack_tiles(&qs, &pos, per, 64, split, &mut tiles, &mut merges);
        let rows = |v: &[u32], n| v[..4 * n].chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect();
        (rows(&tiles, n.tiles), rows(&merges, n.merges))
    }

    /// Every token in exactly one tile of its sequence (of at most `per` tokens, fewest tiles);
    /// a split tile's pieces are consecutive rows at the front, listed by one merge, and cover
    /// its keys 0..last position + 1 in whole 64-key tiles.
    fn check(seqs: &[(u32, u32)], per: usize, (tiles, merges): &Rows) {
        let (qs, pos) = step(seqs);
        let mut seen = vec![0u8; pos.len()];
        let mut piece_rows = vec![false; tiles.len()];
        for m in merges {
            let [lo, hi, first, np] = *m;
            assert!(np >= 2, "a merge of {np} pieces");
            let keys = pos[hi as usize - 1] + 1;
            let mut next = 0;
            for r in first..first + np {
                let t = tiles[r as usize];
                assert_eq!((t[0], t[1]), (lo, hi), "piece {r} belongs to its merge's tile");
                assert!(!piece_rows[r as usize], "piece row {r} in two merges");
                piece_rows[r as usize] = true;
                assert_eq!(t[2], next, "pieces cover the keys in order");
                assert_eq!(t[2] % 64, 0);
                assert!(t[3] > t[2] && (t[3] % 64 == 0 || t[3] == keys), "piece {t:?}");
                next = t[3];
            }
            assert_eq!(next, keys, "the last piece ends at the tile's last position + 1");
        }
        let first_whole = piece_rows.iter().position(|p| !p).unwrap_or(tiles.len());
        assert!(piece_rows[..first_whole].iter().all(|&p| p), "pieces first");
        for (r, t) in tiles.iter().enumerate() {
            let [lo, hi, key_lo, key_hi] = *t;
            assert!(lo < hi && (hi - lo) as usize <= per, "tile {t:?}");
            let seq = qs.partition_point(|&q| q <= lo) - 1;
            assert!(hi <= qs[seq + 1], "tile {t:?} crosses a sequence end");
            if piece_rows[r] {
                // Counted once a tile: at its first piece.
                if key_lo != 0 {
                    continue;
                }
            } else {
                assert_eq!((key_lo, key_hi), (0, WHOLE), "row {r} is whole");
            }
            for i in lo..hi {
                seen[i as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "every token in one tile");
        let want: usize = qs
            .windows(2)
            .map(|w| ((w[1] - w[0]) as usize).div_ceil(per))
            .sum();
        assert_eq!(
            tiles.len() - piece_rows.iter().filter(|&&p| p).count() + merges.len(),
            want
        );
    }

    #[test]
    fn tiles_cover_every_token_once_within_its_sequence() {
        // Sequences of 130, 1 (a decode token in a mixed step) and 64 tokens.
        let seqs = [(0u32, 130u32), (40, 1), (0, 64)];
        for per in [64usize, 128, 32, 16, 9, 8, 1] {
            let rows = pack(&seqs, per, None);
            check(&seqs, per, &rows);
            assert!(rows.1.is_empty());
        }
        // Last tile of a sequence first.
        let whole = |lo, hi| [lo, hi, 0, WHOLE];
        assert_eq!(
            pack(&[(0, 130)], 64, None).0,
            vec![whole(128, 130), whole(64, 128), whole(0, 64)]
        );
        assert_eq!(pack(&[(0, 3), (9, 1)], 8, None).0, vec![whole(0, 3), whole(3, 4)]);
    }

    #[test]
    fn a_chunk_over_a_long_context_is_split_into_pieces() {
        // A 256-token chunk at position 7,744 (8k keys) beside 16 decode tokens, Llama-2-7B's 32
        // KV heads on 132 SMs: two tiles of 128 tokens are 64 blocks, each ~125 key tiles long.
        let split = Split {
            nkv: 32,
            target_blocks: 264,
            max_pieces: 16,
        };
        let mut seqs = vec![(7744u32, 256u32)];
        seqs.extend((0..16).map(|i| (200 + i, 1)));
        let rows = pack(&seqs, 128, Some(split));
        check(&seqs, 128, &rows);
        let (tiles, merges) = &rows;
        assert_eq!(merges.len(), 2, "both chunk tiles split: {merges:?}");
        let pieces: u32 = merges.iter().map(|m| m[3]).sum();
        assert!((4..=16).contains(&pieces), "{pieces} pieces");
        // No piece much longer than a block's share of the work.
        let work: u32 = (8000u32.div_ceil(64) + 7872u32.div_ceil(64)) + 16 * 4;
        let share = (work * 32).div_ceil(264);
        for t in &tiles[..pieces as usize] {
            assert!(
                (t[3] - t[2]).div_ceil(64) <= share + 1,
                "piece {t:?}, share {share}"
            );
        }
        // The buffer bounds the pieces: with room for 5, pieces grow to fit.
        let small = Split {
            max_pieces: 5,
            ..split
        };
        let rows = pack(&seqs, 128, Some(small));
        check(&seqs, 128, &rows);
        assert!(rows.1.iter().map(|m| m[3]).sum::<u32>() <= 5);
        // No room at all: nothing splits.
        let none = Split {
            max_pieces: 0,
            ..split
        };
        assert!(pack(&seqs, 128, Some(none)).1.is_empty());
    }

    #[test]
    fn a_prefill_of_many_tiles_is_not_split() {
        // 4 prompts of 2,048 tokens: 64 tiles × 32 KV heads, already 2,048 blocks.
        let split = Split {
            nkv: 32,
            target_blocks: 264,
            max_pieces: 16,
        };
        let seqs = [(0u32, 2048u32); 4];
        let rows = pack(&seqs, 128, Some(split));
        check(&seqs, 128, &rows);
        assert!(rows.1.is_empty());
        // Short pieces are not worth a merge: 300 keys split at most once.
        let rows = pack(&[(0, 300)], 512, Some(Split { nkv: 1, ..split }));
        check(&[(0, 300)], 512, &rows);
        assert!(rows.1.iter().all(|m| m[3] <= 2));
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
