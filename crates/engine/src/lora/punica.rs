//! Punica-style batched LoRA on the CPU: every token of a step carries the slot of its
//! request's adapter (or none), and one *shrink* and one *expand* apply all adapters at once:
//!
//! ```text
//! shrink:  tmp[t, :r] = scale[s] · x[t] · A[s]ᵀ        s = slot[t], r = rank of s here
//! expand:  y[t]      += tmp[t, :r] · B[s]ᵀ
//! ```
//!
//! Each slot keeps its adapter's matrices at the adapter's own rank (nothing for an empty slot
//! or an untargeted projection), so ranks mix in one stack and `max_loras` costs memory only for
//! the adapters it holds; `tmp` rows are `max_lora_rank` wide whatever the slot's rank.
//! `shrink_ref`/`expand_ref` are the plain loops the fast versions are tested against.

use rayon::prelude::*;

use super::adapter::LoraModule;
use super::LoraSlot;
use crate::cpu::linear::{dot, sgemm, Rhs};
use crate::cpu::ops::multiversion;

/// The adapters' weights of one projection of one layer, one entry per slot (`max_loras`).
/// Each slot holds its adapter's matrices at the adapter's own rank, and nothing when the slot
/// is empty or its adapter does not target this projection: memory follows the adapters in the
/// slots, not `max_loras × max_lora_rank`, and ranks mix freely.
#[derive(Debug, Clone)]
pub struct LoraStack {
    pub in_features: usize,
    pub out_features: usize,
    /// Row stride of the shrink output `tmp` (`max_lora_rank`).
    pub max_rank: usize,
    /// `[max_loras]`
    slots: Vec<SlotWeights>,
    /// `[max_loras]`; 0 where the slot's adapter does not target this projection.
    pub ranks: Vec<usize>,
    /// `[max_loras]`
    pub scales: Vec<f32>,
}

/// One slot's matrices; empty for rank 0.
#[derive(Debug, Clone, Default)]
struct SlotWeights {
    /// `[rank, in_features]`
    a: Vec<f32>,
    /// `[rank, out_features]`: B transposed, so expand is a sum of contiguous rows (axpy) that
    /// vectorizes, rather than one short dot product per output feature.
    bt: Vec<f32>,
}

impl LoraStack {
    pub fn new(max_loras: usize, max_rank: usize, in_features: usize, out_features: usize) -> Self {
        LoraStack {
            in_features,
            out_features,
            max_rank,
            slots: vec![SlotWeights::default(); max_loras],
            ranks: vec![0; max_loras],
            scales: vec![0.0; max_loras],
        }
    }

    /// Copies a module's weights into `slot` (or clears it, freeing its memory).
    pub fn set(&mut self, slot: LoraSlot, module: Option<&LoraModule>) {
        let s = slot.index();
        let (i, o) = (self.in_features, self.out_features);
        let w = &mut self.slots[s];
        w.a.clear();
        w.bt.clear();
        match module {
            None => {
                w.a.shrink_to_fit();
                w.bt.shrink_to_fit();
                self.ranks[s] = 0;
                self.scales[s] = 0.0;
            }
            Some(m) => {
                assert!(
                    m.rank <= self.max_rank,
                    "adapter rank checked against max_lora_rank at load"
                );
                assert_eq!((m.a.len(), m.b.len()), (m.rank * i, o * m.rank), "module shapes");
                w.a.extend_from_slice(&m.a);
                // m.b is [out, rank]; keep it as [rank, out].
                w.bt.resize(m.rank * o, 0.0);
                for (oi, src) in m.b.chunks_exact(m.rank).enumerate() {
                    for (r, &v) in src.iter().enumerate() {
                        w.bt[r * o + oi] = v;
                    }
                }
                self.ranks[s] = m.rank;
                self.scales[s] = m.scale;
            }
        }
    }

    /// Bytes the slots' matrices take.
    pub fn weight_bytes(&self) -> usize {
        let floats: usize = self.slots.iter().map(|w| w.a.capacity() + w.bt.capacity()).sum();
        floats * std::mem::size_of::<f32>()
    }

    /// Slot `s`'s A, `[rank, in_features]`.
    fn a(&self, s: usize) -> &[f32] {
        &self.slots[s].a
    }

    /// Slot `s`'s transposed B, `[rank, out_features]`.
    fn bt(&self, s: usize) -> &[f32] {
        &self.slots[s].bt
    }

    fn a_row(&self, s: usize, r: usize) -> &[f32] {
        let i = self.in_features;
        &self.a(s)[r * i..][..i]
    }

    /// Row `r` of slot `s`'s transposed B: `[out_features]`.
    fn bt_row(&self, s: usize, r: usize) -> &[f32] {
        let o = self.out_features;
        &self.bt(s)[r * o..][..o]
    }
}

/// Reference shrink. `x: [T, in]`, `slots: [T]`, `tmp: [T, max_rank]`.
pub fn shrink_ref(x: &[f32], stack: &LoraStack, slots: &[Option<LoraSlot>], tmp: &mut [f32]) {
    let (i, r_max) = (stack.in_features, stack.max_rank);
    for t in 0..slots.len() {
        for r in 0..r_max {
            tmp[t * r_max + r] = 0.0;
        }
        let Some(slot) = slots[t] else { continue };
        let s = slot.index();
        for r in 0..stack.ranks[s] {
            let mut acc = 0.0f32;
            for k in 0..i {
                acc += x[t * i + k] * stack.a(s)[r * i + k];
            }
            tmp[t * r_max + r] = stack.scales[s] * acc;
        }
    }
}

/// Reference expand. `tmp: [T, max_rank]`, `y: [T, out]` (accumulated into).
pub fn expand_ref(tmp: &[f32], stack: &LoraStack, slots: &[Option<LoraSlot>], y: &mut [f32]) {
    let (o_n, r_max) = (stack.out_features, stack.max_rank);
    for t in 0..slots.len() {
        let Some(slot) = slots[t] else { continue };
        let s = slot.index();
        for o in 0..o_n {
            let mut acc = 0.0f32;
            for r in 0..stack.ranks[s] {
                acc += tmp[t * r_max + r] * stack.bt(s)[r * o_n + o];
            }
            y[t * o_n + o] += acc;
        }
    }
}

/// Below this many multiply-adds a shrink or expand runs on the calling thread: handing a few
/// thousand FMAs to the rayon pool (the demo model's LoRA ops) costs more than doing them.
const PAR_MIN_WORK: usize = 1 << 16;

/// Runs of at least this many consecutive tokens with one adapter (a prompt being prefilled)
/// take the GEMM in [`shrink`] and [`expand`]; shorter ones (decodes) the per-token loops.
pub const GEMM_MIN_SEGMENT: usize = 8;

/// Fast shrink: each run of [`GEMM_MIN_SEGMENT`] or more tokens with one adapter is one GEMM
/// (`tmp[run, :r] = scale · x[run] · A[s, :r]ᵀ`); the other tokens go through the per-token loop.
pub fn shrink(x: &[f32], stack: &LoraStack, slots: &[Option<LoraSlot>], tmp: &mut [f32]) {
    let (i, r_max) = (stack.in_features, stack.max_rank);
    for_runs(slots, |range, slot| match slot {
        Some(slot) if range.len() >= GEMM_MIN_SEGMENT && stack.ranks[slot.index()] > 0 => {
            let (s, n) = (slot.index(), range.len());
            let rank = stack.ranks[s];
            let tmp = &mut tmp[range.start * r_max..range.end * r_max];
            let x = &x[range.start * i..range.end * i];
            let a = stack.a(s);
            for row in tmp.chunks_exact_mut(r_max) {
                row[rank..].fill(0.0);
            }
            // SAFETY: dst is tmp[run] as [n, rank] (row stride r_max), lhs x[run] [n, i]
            // row-major, rhs A[s, :rank]ᵀ read as [i, rank] from A's [rank, i] rows; all within
            // the slices taken above, and tmp aliases neither. dst = scale · x · Aᵀ (not read).
            unsafe {
                let rhs = Rhs::Transposed(a.as_ptr(), i);
                sgemm(
                    (n, rank, i),
                    (tmp.as_mut_ptr(), r_max),
                    false,
                    (x.as_ptr(), i),
                    rhs,
                    stack.scales[s],
                    true,
                )
            }
        }
        _ => shrink_tokens(
            &x[range.start * i..range.end * i],
            stack,
            &slots[range.clone()],
            &mut tmp[range.start * r_max..range.end * r_max],
        ),
    });
}

/// Fast expand: each run of [`GEMM_MIN_SEGMENT`] or more tokens with one adapter is one GEMM
/// (`y[run] += tmp[run, :r] · Bᵀ[s, :r]`); the other tokens go through the per-token loop.
pub fn expand(tmp: &[f32], stack: &LoraStack, slots: &[Option<LoraSlot>], y: &mut [f32]) {
    let (o_n, r_max) = (stack.out_features, stack.max_rank);
    for_runs(slots, |range, slot| match slot {
        Some(slot) if range.len() >= GEMM_MIN_SEGMENT && stack.ranks[slot.index()] > 0 => {
            let (s, n) = (slot.index(), range.len());
            let rank = stack.ranks[s];
            let y = &mut y[range.start * o_n..range.end * o_n];
            let tmp = &tmp[range.start * r_max..range.end * r_max];
            let bt = stack.bt(s);
            // SAFETY: dst is y[run] [n, o_n] row-major, lhs tmp[run] read as [n, rank] (row
            // stride r_max), rhs Bᵀ[s, :rank] [rank, o_n] row-major; all within the slices taken
            // above, and y aliases neither. dst = dst + tmp · Bᵀ.
            unsafe {
                let rhs = Rhs::RowMajor(bt.as_ptr(), o_n);
                sgemm(
                    (n, o_n, rank),
                    (y.as_mut_ptr(), o_n),
                    true,
                    (tmp.as_ptr(), r_max),
                    rhs,
                    1.0,
                    true,
                )
            }
        }
        _ => expand_tokens(
            &tmp[range.start * r_max..range.end * r_max],
            stack,
            &slots[range.clone()],
            &mut y[range.start * o_n..range.end * o_n],
        ),
    });
}

/// Calls `f(range, slot)` for the token ranges `[start, end)` of a step in which every token
/// has the same slot, except that when no range is long enough for the GEMM the whole step is
/// one call (the per-token loops then see every token at once and split them over threads).
fn for_runs(slots: &[Option<LoraSlot>], mut f: impl FnMut(std::ops::Range<usize>, Option<LoraSlot>)) {
    let run_end = |start: usize| {
        let s = slots[start];
        start + slots[start..].iter().take_while(|&&x| x == s).count()
    };
    let mut has_long_run = false;
    let mut start = 0;
    while start < slots.len() {
        let end = run_end(start);
        has_long_run |= end - start >= GEMM_MIN_SEGMENT && slots[start].is_some();
        start = end;
    }
    if !has_long_run {
        // The slot passed is only used for runs long enough for the GEMM: this one is not.
        f(0..slots.len(), None);
        return;
    }
    let mut start = 0;
    while start < slots.len() {
        let end = run_end(start);
        f(start..end, slots[start]);
        start = end;
    }
}

/// Per-token shrink: tokens in parallel (serially when small), each reading only its slot's
/// first `rank` rows of A.
fn shrink_tokens(x: &[f32], stack: &LoraStack, slots: &[Option<LoraSlot>], tmp: &mut [f32]) {
    let (i, r_max) = (stack.in_features, stack.max_rank);
    let num_tokens = slots.len();
    let token = |((out, xt), slot): ((&mut [f32], &[f32]), &Option<LoraSlot>)| {
        out.fill(0.0);
        if let Some(slot) = slot {
            let s = slot.index();
            let scale = stack.scales[s];
            for (r, o) in out.iter_mut().enumerate().take(stack.ranks[s]) {
                *o = scale * dot(xt, stack.a_row(s, r));
            }
        }
    };
    let (tmp, x) = (&mut tmp[..num_tokens * r_max], &x[..num_tokens * i]);
    if num_tokens * r_max * i < PAR_MIN_WORK {
        tmp.chunks_mut(r_max).zip(x.chunks(i)).zip(slots).for_each(token);
    } else {
        tmp.par_chunks_mut(r_max)
            .zip(x.par_chunks(i))
            .zip(slots.par_iter())
            .for_each(token);
    }
}

/// Per-token expand: tokens in parallel (serially when small); `y[t] += tmp[t, r] · Bᵀ[s, r]`
/// for each rank row.
fn expand_tokens(tmp: &[f32], stack: &LoraStack, slots: &[Option<LoraSlot>], y: &mut [f32]) {
    let (o_n, r_max) = (stack.out_features, stack.max_rank);
    let num_tokens = slots.len();
    let token = |((yt, tt), slot): ((&mut [f32], &[f32]), &Option<LoraSlot>)| {
        let Some(slot) = slot else { return };
        let s = slot.index();
        let rank = stack.ranks[s];
        for (r, &c) in tt[..rank].iter().enumerate() {
            axpy(c, stack.bt_row(s, r), yt);
        }
    };
    let (y, tmp) = (&mut y[..num_tokens * o_n], &tmp[..num_tokens * r_max]);
    if num_tokens * r_max * o_n < PAR_MIN_WORK {
        y.chunks_mut(o_n)
            .zip(tmp.chunks(r_max))
            .zip(slots)
            .for_each(token);
    } else {
        y.par_chunks_mut(o_n)
            .zip(tmp.par_chunks(r_max))
            .zip(slots.par_iter())
            .for_each(token);
    }
}

multiversion! {
    /// `y += c · x`
    fn axpy(c: f32, x: &[f32], y: &mut [f32]) => axpy_impl
}

#[inline(always)]
fn axpy_impl(c: f32, x: &[f32], y: &mut [f32]) {
    for (yo, &xv) in y.iter_mut().zip(x) {
        *yo += c * xv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_module(rng: &mut impl Rng, rank: usize, i: usize, o: usize) -> LoraModule {
        LoraModule {
            rank,
            scale: rng.random_range(0.5..2.0),
            a: (0..rank * i).map(|_| rng.random_range(-1.0..1.0)).collect(),
            b: (0..o * rank).map(|_| rng.random_range(-1.0..1.0)).collect(),
        }
    }

    /// The fast ops equal the reference loops across batch sizes, ranks, slot mixes and rows
    /// without an adapter, on both sides of PAR_MIN_WORK (the 64-token case runs in parallel).
    #[test]
    fn fast_matches_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &(num_tokens, max_loras, max_rank, i, o) in &[
            (1, 1, 8, 16, 24),
            (5, 3, 16, 33, 17),
            (64, 8, 32, 64, 96),
            (7, 4, 64, 128, 40),
        ] {
            let mut stack = LoraStack::new(max_loras, max_rank, i, o);
            for s in 0..max_loras {
                // slot 1 stays empty for this projection (adapter that does not target it)
                if s == 1 {
                    continue;
                }
                let rank = [max_rank, 1, max_rank / 2, 3][s % 4].max(1);
                stack.set(LoraSlot(s as u32), Some(&random_module(&mut rng, rank, i, o)));
            }
            let slots: Vec<Option<LoraSlot>> = (0..num_tokens)
                .map(|_| {
                    let s = rng.random_range(0..=max_loras);
                    (s < max_loras).then_some(LoraSlot(s as u32))
                })
                .collect();
            let x: Vec<f32> = (0..num_tokens * i).map(|_| rng.random_range(-1.0..1.0)).collect();
            let y0: Vec<f32> = (0..num_tokens * o).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (mut t_ref, mut t_fast) =
                (vec![1.0; num_tokens * max_rank], vec![2.0; num_tokens * max_rank]);
            shrink_ref(&x, &stack, &slots, &mut t_ref);
            shrink(&x, &stack, &slots, &mut t_fast);
            let (mut y_ref, mut y_fast) = (y0.clone(), y0.clone());
            expand_ref(&t_ref, &stack, &slots, &mut y_ref);
            expand(&t_fast, &stack, &slots, &mut y_fast);
            for (a, b) in t_ref.iter().zip(&t_fast).chain(y_ref.iter().zip(&y_fast)) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
            }
            // rows without an adapter are untouched
            for t in 0..num_tokens {
                if slots[t].is_none() {
                    assert_eq!(y_fast[t * o..(t + 1) * o], y0[t * o..(t + 1) * o]);
                }
            }
        }
    }

    /// Prefill-shaped steps: runs of one adapter long enough for the GEMM (of odd lengths,
    /// ranks and shapes) next to short runs, rows without an adapter and a slot whose adapter
    /// does not target the projection; the fast ops equal the reference loops.
    #[test]
    fn gemm_runs_match_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for &(max_rank, i, o) in &[(16, 33, 17), (8, 64, 96), (64, 130, 40)] {
            let max_loras = 4;
            let mut stack = LoraStack::new(max_loras, max_rank, i, o);
            for (s, rank) in [(0, max_rank), (2, 1), (3, max_rank / 2 + 1)] {
                stack.set(LoraSlot(s), Some(&random_module(&mut rng, rank, i, o)));
            }
            let runs: [(Option<u32>, usize); 7] = [
                (Some(0), 37),
                (None, 9),
                (Some(2), GEMM_MIN_SEGMENT),
                (Some(3), GEMM_MIN_SEGMENT - 1),
                (Some(1), 12), // empty slot
                (Some(3), 20),
                (Some(0), 1),
            ];
            let slots: Vec<Option<LoraSlot>> = runs
                .iter()
                .flat_map(|&(s, n)| std::iter::repeat_n(s.map(LoraSlot), n))
                .collect();
            let num_tokens = slots.len();
            let x: Vec<f32> = (0..num_tokens * i).map(|_| rng.random_range(-1.0..1.0)).collect();
            let y0: Vec<f32> = (0..num_tokens * o).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (mut t_ref, mut t_fast) = (
                vec![1.0; num_tokens * max_rank],
                vec![f32::NAN; num_tokens * max_rank],
            );
            shrink_ref(&x, &stack, &slots, &mut t_ref);
            shrink(&x, &stack, &slots, &mut t_fast);
            let (mut y_ref, mut y_fast) = (y0.clone(), y0.clone());
            expand_ref(&t_ref, &stack, &slots, &mut y_ref);
            expand(&t_fast, &stack, &slots, &mut y_fast);
            for (a, b) in t_ref.iter().zip(&t_fast).chain(y_ref.iter().zip(&y_fast)) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
            }
        }
    }

    /// Memory follows the adapters in the slots: 128 slots of `max_lora_rank` 64 hold nothing
    /// until filled, two rank-8 adapters take their own size, and clearing one frees it.
    #[test]
    fn slots_cost_memory_only_for_the_adapters_they_hold() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (i, o) = (96, 40);
        let mut stack = LoraStack::new(128, 64, i, o);
        assert_eq!(stack.weight_bytes(), 0);
        stack.set(LoraSlot(5), Some(&random_module(&mut rng, 8, i, o)));
        stack.set(LoraSlot(100), Some(&random_module(&mut rng, 8, i, o)));
        assert_eq!(stack.weight_bytes(), 2 * 8 * (i + o) * 4);
        stack.set(LoraSlot(5), None);
        assert_eq!(stack.weight_bytes(), 8 * (i + o) * 4);
    }

    #[test]
    fn clearing_a_slot_removes_its_effect() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut stack = LoraStack::new(2, 8, 16, 16);
        stack.set(LoraSlot(0), Some(&random_module(&mut rng, 8, 16, 16)));
        stack.set(LoraSlot(0), None);
        let x = vec![1.0; 16];
        let mut tmp = vec![0.0; 8];
        let mut y = vec![0.5; 16];
        shrink(&x, &stack, &[Some(LoraSlot(0))], &mut tmp);
        expand(&tmp, &stack, &[Some(LoraSlot(0))], &mut y);
        assert!(y.iter().all(|&v| v == 0.5));
    }
}
