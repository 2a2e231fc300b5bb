//! Causal attention over the paged KV cache on the CPU (prefill and decode tokens alike), and
//! the plain per-token loop it is tested against.

use std::cell::RefCell;

use rayon::prelude::*;

use super::linear::dot;
use super::ops::{dot_lanes, fast_exp, multiversion, sum_lanes, SendPtr};

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// What attention needs to know about the step's sequences.
pub struct AttnMeta<'a> {
    /// `[num_seqs + 1]` token offsets of each sequence in the step
    pub query_start: &'a [u32],
    /// `[T]` absolute position of each token
    pub positions: &'a [u32],
    /// `[num_seqs, max_blocks_per_seq]`
    pub block_tables: &'a [u32],
    pub max_blocks_per_seq: usize,
    pub block_size: usize,
}

/// Query tokens a work item of [`paged_attention`] takes (times the heads sharing a KV head).
const ATTN_QUERY_BLOCK: usize = 16;
/// Keys read per block: each block of K (`64 × head_dim` f32) is gathered from its pages into a
/// transposed copy that stays in cache (L1 for head_dim ≤ 128) while every query row of the work
/// item uses it; V rows are read in place.
const ATTN_KEY_BLOCK: usize = 64;
/// From this many query rows (tokens × query heads per KV head) a work item gathers K; below (a
/// decode token, up to 8 query heads per KV head), it reads K in place. At 4, a GQA-4 model's
/// decode steps were 12% slower (`cpu_steps`, 8 sequences over 1,024 cached tokens, 3
/// alternations).
const ATTN_GATHER_MIN_ROWS: usize = 16;

/// Scratch of one [`paged_attention`] work item: `rows = query tokens × group` rows.
#[derive(Default)]
struct AttnScratch {
    /// `[rows]` running max of the scores
    max: Vec<f32>,
    /// `[rows]` running sum of fast_exp(score - max)
    sum: Vec<f32>,
    /// `[rows, head_dim]` unnormalized output
    acc: Vec<f32>,
    /// `[head_dim, ATTN_KEY_BLOCK]` the key block's K rows of this KV head, transposed
    kt: Vec<f32>,
}

thread_local! {
    static ATTN_SCRATCH: RefCell<AttnScratch> = RefCell::new(AttnScratch::default());
}

/// What every work item of one [`paged_attention`] call reads, and where it writes.
struct Attn<'a> {
    q: &'a [f32],
    k_cache: &'a [f32],
    v_cache: &'a [f32],
    meta: &'a AttnMeta<'a>,
    num_heads: usize,
    head_dim: usize,
    /// query heads per KV head
    group: usize,
    kv_row: usize,
    scale: f32,
    out: SendPtr,
}

/// A work item: query tokens `t0..t1` of sequence `seq` with the query heads of KV head `kvh`.
#[derive(Clone, Copy)]
struct Item {
    seq: usize,
    kvh: usize,
    t0: usize,
    t1: usize,
}

/// Causal attention over the paged KV cache, for prefill and decode tokens alike: token `t` of a
/// sequence attends to every cached position up to its own (the step's K/V are written first).
/// `q: [T, num_heads * hd]`, caches `[num_blocks * block_size, num_kv_heads * hd]`,
/// `out: [T, num_heads * hd]`.
///
/// Blocked as FlashAttention is: a work item is (sequence, KV head, block of up to
/// `ATTN_QUERY_BLOCK` query tokens) with every query head of that KV head, so each key and
/// value is read once per item rather than once per query token and head; keys come in blocks of
/// `ATTN_KEY_BLOCK` with an online softmax. Items run in parallel across sequences, heads and
/// query blocks. [`paged_attention_ref`] is the plain per-token loop it is tested against.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    meta: &AttnMeta<'_>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    let num_seqs = meta.query_start.len() - 1;
    let num_tokens = meta.positions.len();
    assert!(out.len() >= num_tokens * num_heads * head_dim);
    // Work items write the rows of their own tokens: sequences must not overlap.
    assert!(
        meta.query_start.windows(2).all(|w| w[0] <= w[1])
            && meta.query_start.last().is_some_and(|&e| e as usize <= num_tokens),
        "query_start must rise to at most the step's tokens"
    );
    let attn = Attn {
        q,
        k_cache,
        v_cache,
        meta,
        num_heads,
        head_dim,
        group: num_heads / num_kv_heads,
        kv_row: num_kv_heads * head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        out: SendPtr(out.as_mut_ptr()),
    };
    let seq_start = |s: usize| meta.query_start[s] as usize;
    let max_blocks = (0..num_seqs)
        .map(|s| (seq_start(s + 1) - seq_start(s)).div_ceil(ATTN_QUERY_BLOCK))
        .max()
        .unwrap_or(0);
    (0..num_seqs * num_kv_heads * max_blocks)
        .into_par_iter()
        .for_each(|i| {
            let (seq, rest) = (i / (num_kv_heads * max_blocks), i % (num_kv_heads * max_blocks));
            let (kvh, qb) = (rest / max_blocks, rest % max_blocks);
            let t0 = seq_start(seq) + qb * ATTN_QUERY_BLOCK;
            let t1 = (t0 + ATTN_QUERY_BLOCK).min(seq_start(seq + 1));
            if t0 < t1 {
                ATTN_SCRATCH.with_borrow_mut(|sc| attn_item(&attn, Item { seq, kvh, t0, t1 }, sc));
            }
        });
}

multiversion! {
    fn attn_item(a: &Attn<'_>, item: Item, sc: &mut AttnScratch) => attn_item_impl
}

/// One work item of [`paged_attention`]: per key block, gather the block's K rows from their
/// pages (transposed, when enough rows use them), then for each query row its scores against the
/// block (the key dimension in vector lanes, no horizontal sums), the online-softmax update and
/// `P · V` (V rows read in place).
#[inline(always)]
fn attn_item_impl(a: &Attn<'_>, Item { seq, kvh, t0, t1 }: Item, sc: &mut AttnScratch) {
    let (meta, hd, group) = (a.meta, a.head_dim, a.group);
    let table = &meta.block_tables[seq * meta.max_blocks_per_seq..][..meta.max_blocks_per_seq];
    let bs = meta.block_size;
    let rows = (t1 - t0) * group;
    // Row i is token t0 + i / group, query head kvh * group + i % group.
    let ctx_end = meta.positions[t0..t1].iter().max().map_or(0, |&p| p as usize + 1);
    sc.max.clear();
    sc.max.resize(rows, f32::NEG_INFINITY);
    sc.sum.clear();
    sc.sum.resize(rows, 0.0);
    sc.acc.clear();
    sc.acc.resize(rows * hd, 0.0);
    sc.kt.resize(hd * ATTN_KEY_BLOCK, 0.0);
    // With few rows (decode) each key is used by few of them: read K in place, not gathered.
    let gather = rows >= ATTN_GATHER_MIN_ROWS;
    let mut at = [0usize; ATTN_KEY_BLOCK];
    for p0 in (0..ctx_end).step_by(ATTN_KEY_BLOCK) {
        let nk = ATTN_KEY_BLOCK.min(ctx_end - p0);
        // Where key p0 + j's row of this KV head starts in either cache.
        for (j, at) in at[..nk].iter_mut().enumerate() {
            let p = p0 + j;
            *at = (table[p / bs] as usize * bs + p % bs) * a.kv_row + kvh * hd;
        }
        if gather {
            for (j, &at) in at[..nk].iter().enumerate() {
                for (d, &k) in a.k_cache[at..][..hd].iter().enumerate() {
                    sc.kt[d * ATTN_KEY_BLOCK + j] = k;
                }
            }
        }
        let v_row = |j: usize| &a.v_cache[at[j]..][..hd];
        for i in 0..rows {
            let t = t0 + i / group;
            let last = meta.positions[t] as usize; // causal limit
            if p0 > last {
                continue;
            }
            let n = nk.min(last + 1 - p0);
            let qi = &a.q[(t * a.num_heads + kvh * group + i % group) * hd..][..hd];
            let mut scores = [0.0f32; ATTN_KEY_BLOCK];
            if gather {
                // Against the block's first n keys rounded up to 16 (the columns past n are
                // stale and ignored): a fixed width keeps the accumulators in registers.
                match n.div_ceil(16) {
                    1 => block_scores::<16>(qi, &sc.kt, &mut scores),
                    2 => block_scores::<32>(qi, &sc.kt, &mut scores),
                    3 => block_scores::<48>(qi, &sc.kt, &mut scores),
                    _ => block_scores::<ATTN_KEY_BLOCK>(qi, &sc.kt, &mut scores),
                }
            } else {
                for (s, &at) in scores[..n].iter_mut().zip(&at) {
                    *s = dot_lanes(qi, &a.k_cache[at..][..hd]);
                }
            }
            let s = &mut scores[..n];
            let mut block_max = f32::NEG_INFINITY;
            for sj in s.iter_mut() {
                *sj *= a.scale;
                block_max = block_max.max(*sj);
            }
            let new_max = sc.max[i].max(block_max);
            let correction = fast_exp(sc.max[i] - new_max);
            sc.max[i] = new_max;
            for sj in s.iter_mut() {
                *sj = fast_exp(*sj - new_max);
            }
            sc.sum[i] = sc.sum[i] * correction + sum_lanes(s);
            let acc = &mut sc.acc[i * hd..][..hd];
            if correction != 1.0 {
                acc.iter_mut().for_each(|x| *x *= correction);
            }
            // acc += P · V, a register-wide slice of columns at a time over every key.
            let mut d0 = 0;
            while d0 + 32 <= hd {
                pv_columns::<32>(s, v_row, d0, acc);
                d0 += 32;
            }
            while d0 + 8 <= hd {
                pv_columns::<8>(s, v_row, d0, acc);
                d0 += 8;
            }
            while d0 < hd {
                pv_columns::<1>(s, v_row, d0, acc);
                d0 += 1;
            }
        }
    }
    for i in 0..rows {
        let (t, h) = (t0 + i / group, kvh * group + i % group);
        let inv = 1.0 / sc.sum[i];
        for (d, &x) in sc.acc[i * hd..][..hd].iter().enumerate() {
            // SAFETY: (t, h) belongs to this item only (its tokens, its KV head's query heads);
            // the index is within out, asserted in `paged_attention`.
            unsafe { *a.out.get().add((t * a.num_heads + h) * hd + d) = x * inv };
        }
    }
}

/// `scores[..W] = q · kt[.., ..W]`, `kt` being `[head_dim, ATTN_KEY_BLOCK]`.
#[inline(always)]
fn block_scores<const W: usize>(q: &[f32], kt: &[f32], scores: &mut [f32; ATTN_KEY_BLOCK]) {
    let mut acc = [0.0f32; W];
    for (&qd, kt) in q.iter().zip(kt.chunks_exact(ATTN_KEY_BLOCK)) {
        for (s, &k) in acc.iter_mut().zip(&kt[..W]) {
            *s += qd * k;
        }
    }
    scores[..W].copy_from_slice(&acc);
}

/// `acc[d0..d0 + W] += Σ_j weights[j] · v_row(j)[d0..d0 + W]` with the `W` sums held in
/// registers across the keys.
#[inline(always)]
fn pv_columns<'v, const W: usize>(
    weights: &[f32],
    v_row: impl Fn(usize) -> &'v [f32],
    d0: usize,
    acc: &mut [f32],
) {
    let mut r: [f32; W] = acc[d0..d0 + W].try_into().expect("W columns");
    for (j, &e) in weights.iter().enumerate() {
        let vj = &v_row(j)[d0..][..W];
        for l in 0..W {
            r[l] += e * vj[l];
        }
    }
    acc[d0..d0 + W].copy_from_slice(&r);
}

/// The plain per-(token, head) attention loop [`paged_attention`] is tested against.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_ref(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    meta: &AttnMeta<'_>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    let group = num_heads / num_kv_heads;
    let kv_row = num_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let num_tokens = meta.positions.len();
    out[..num_tokens * num_heads * head_dim]
        .par_chunks_mut(head_dim)
        .enumerate()
        .for_each(|(idx, o)| {
            let (t, h) = (idx / num_heads, idx % num_heads);
            let seq = meta.query_start.partition_point(|&s| s as usize <= t) - 1;
            let table =
                &meta.block_tables[seq * meta.max_blocks_per_seq..(seq + 1) * meta.max_blocks_per_seq];
            let ctx = meta.positions[t] as usize + 1;
            let kvh = h / group;
            let qh = &q[(t * num_heads + h) * head_dim..][..head_dim];
            let slot = |p: usize| table[p / meta.block_size] as usize * meta.block_size + p % meta.block_size;
            SCORES.with_borrow_mut(|scores| {
                scores.clear();
                scores.resize(ctx, 0.0);
                let mut max = f32::NEG_INFINITY;
                for (p, s) in scores.iter_mut().enumerate() {
                    let k = &k_cache[slot(p) * kv_row + kvh * head_dim..][..head_dim];
                    *s = dot(qh, k) * scale;
                    max = max.max(*s);
                }
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                o.fill(0.0);
                for (p, &s) in scores.iter().enumerate() {
                    let v = &v_cache[slot(p) * kv_row + kvh * head_dim..][..head_dim];
                    let w = s / sum;
                    for (oi, &vi) in o.iter_mut().zip(v) {
                        *oi += w * vi;
                    }
                }
            });
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_attention_matches_the_per_token_loop() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let block_size = 4;
        // Sequences as (first position, tokens this step): a prompt longer than one query and
        // one key block, a chunk that continues a prompt, decodes, a one-token prompt.
        let seqs = [(0usize, 37usize), (50, 20), (130, 1), (0, 1), (9, 3)];
        // Head sizes off every column step (32, 8, 1) and GQA groups 1, 3, 4 and 8.
        for (num_heads, num_kv_heads, head_dim) in [(4, 4, 8), (6, 2, 12), (3, 1, 5), (8, 2, 40), (8, 1, 128)]
        {
            let max_blocks_per_seq = 160usize.div_ceil(block_size);
            let num_blocks = seqs.len() * max_blocks_per_seq;
            // A shuffled block table, so pages are not in position order.
            let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, rng.random_range(0..=i));
            }
            let kv_row = num_kv_heads * head_dim;
            let mut rnd = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
            let (k_cache, v_cache) = (
                rnd(num_blocks * block_size * kv_row),
                rnd(num_blocks * block_size * kv_row),
            );
            let (mut query_start, mut positions) = (vec![0u32], Vec::new());
            for &(first, n) in &seqs {
                positions.extend((first..first + n).map(|p| p as u32));
                query_start.push(positions.len() as u32);
            }
            let t = positions.len();
            let q = rnd(t * num_heads * head_dim);
            let meta = AttnMeta {
                query_start: &query_start,
                positions: &positions,
                block_tables: &ids,
                max_blocks_per_seq,
                block_size,
            };
            let mut want = vec![0.0; t * num_heads * head_dim];
            paged_attention_ref(
                &q,
                &k_cache,
                &v_cache,
                &meta,
                num_heads,
                num_kv_heads,
                head_dim,
                &mut want,
            );
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = vec![f32::NAN; t * num_heads * head_dim];
                pool.install(|| {
                    paged_attention(
                        &q,
                        &k_cache,
                        &v_cache,
                        &meta,
                        num_heads,
                        num_kv_heads,
                        head_dim,
                        &mut got,
                    )
                });
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() < 1e-5,
                        "heads {num_heads}/{num_kv_heads} d {head_dim} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }
}
