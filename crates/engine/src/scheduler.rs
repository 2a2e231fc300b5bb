//! Continuous batching with chunked prefill, as vLLM V1 schedules. Each step has a budget of
//! `max_num_batched_tokens` tokens:
//!
//! 1. Running sequences first, oldest first: a decoding sequence takes one token, one still in
//!    its prompt (partially prefilled) takes `min(remaining prompt, remaining budget)` — and at
//!    most `long_prefill_token_threshold` tokens when that is set (vLLM's setting: it bounds a
//!    long prompt's share of a step, so the decodes beside it keep their pace). Blocks
//!    are grown for the tokens computed so far plus this step's; when the cache is full the
//!    newest running sequences are preempted, recompute-style (they lose their KV cache and go
//!    back to the front of the waiting queue, to restart from token 0).
//! 2. Then, if nothing was preempted, waiting requests are admitted first come first served
//!    within `max_num_seqs`, the remaining budget and the free blocks; the last one admitted
//!    may get only a chunk of its prompt, and carries on in step 1 of the next steps. A waiting
//!    request is passed over (it keeps its place, the ones behind it are considered) while its
//!    adapter is not ready (still loading into host memory: the engine loads the adapters the
//!    queue's head needs in the background, so requests whose adapters are ready go first) or
//!    would make the step use more than `max_loras` distinct adapters; running requests are
//!    never preempted for it.
//!
//! Passing over is bounded: a request is passed over (skipped while a request behind it is
//! admitted) in at most `max_times_passed_over` steps. Once it has been, admission stops at it:
//! nothing behind it is admitted until it is. Then the
//! running requests finish (each within `max_model_len` tokens), freeing `max_loras`; its
//! adapter finishes loading (the engine's load window starts at the queue's head, and eviction
//! spares what the window wants); and it is admitted as with plain FCFS.
//!
//! So a long prompt is prefilled over several steps, sharing each with the running decodes,
//! which keep producing a token a step: without `long_prefill_token_threshold` a partial chunk
//! uses up the budget, so at most one running sequence is partially prefilled and it is the
//! newest, scheduled after every decode (with the threshold, several may be, and a request
//! admitted behind one decodes after it); and the engine requires `max_num_batched_tokens >=
//! max_num_seqs`, so the decodes fit. A
//! sequence whose chunk stops short of its last token produces no token that step (the
//! engine's part).
//!
//! Cannot deadlock or starve: the oldest running sequence is never a victim unless it is the
//! only one running, and alone it fits — the engine refused at `add_request` anything longer
//! than `max_model_len`, and sized the cache for at least one such sequence — and the budget is
//! at least 1, so it computes at least one token every step until it finishes. With nothing
//! running, the first waiting request whose adapter is ready is admitted: its adapter is the
//! only one, and a chunk of it fits the budget and the cache (if no adapter is ready, the
//! engine waits for a load).

use std::collections::{HashMap, VecDeque};

use crate::block_manager::BlockManager;
use crate::lora::AdapterId;
use crate::sequence::{SeqId, Sequence};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Distinct adapters per step; irrelevant when LoRA is disabled (no request has one).
    pub max_loras: usize,
    /// Steps in which a waiting request may be passed over before admission stops at it.
    pub max_times_passed_over: u32,
    /// Most prompt tokens one sequence computes in a step; 0: no bound but the budget.
    pub long_prefill_token_threshold: usize,
}

impl SchedulerConfig {
    /// Tokens a sequence with `remaining` uncomputed tokens takes from `budget` this step.
    fn chunk(&self, remaining: usize, budget: usize) -> usize {
        let n = match self.long_prefill_token_threshold {
            0 => remaining,
            t => remaining.min(t),
        };
        n.min(budget)
    }
}

/// Tokens `[num_computed_tokens, num_computed_tokens + num_new_tokens)` of `id` run this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    pub num_new_tokens: usize,
}

#[derive(Debug, Default)]
pub struct Schedule {
    pub scheduled: Vec<ScheduledSeq>,
    /// Sequences that lost their KV cache this step and went back to waiting.
    pub preempted: Vec<SeqId>,
    /// Sequences admitted from waiting this step (a subset of `scheduled`).
    pub admitted: Vec<SeqId>,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    out: Schedule,
    step_loras: Vec<AdapterId>,
    /// Waiting requests skipped this step, each with the number admitted before it was.
    passed_over: Vec<(SeqId, usize)>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Scheduler {
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            out: Schedule::default(),
            step_loras: Vec::new(),
            passed_over: Vec::new(),
        }
    }

    pub fn add(&mut self, id: SeqId) {
        self.waiting.push_back(id);
    }

    /// Queues the forked choices of a request ahead of everything waiting, in order: they
    /// hold blocks shared with a running sequence, and their prompt is all but computed.
    pub fn add_front(&mut self, ids: &[SeqId]) {
        for &id in ids.iter().rev() {
            self.waiting.push_front(id);
        }
    }

    /// Frees the blocks of waiting sequences that hold some (forked choices: their shared
    /// prompt blocks), so that when the cache runs short only running sequences hold blocks,
    /// as the module's argument needs; they recompute their prompt when admitted. False if
    /// none held any.
    fn release_waiting_blocks(&self, seqs: &mut HashMap<SeqId, Sequence>, blocks: &mut BlockManager) -> bool {
        let mut is_any = false;
        for id in &self.waiting {
            let seq = seqs.get_mut(id).expect("waiting seq exists");
            if !seq.block_table.is_empty() {
                blocks.free(&mut seq.block_table);
                seq.num_computed_tokens = 0;
                is_any = true;
            }
        }
        is_any
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Adapters of running sequences: the ones the host cache must not evict.
    pub fn running_loras<'a>(
        &'a self,
        seqs: &'a HashMap<SeqId, Sequence>,
    ) -> impl Iterator<Item = AdapterId> + 'a {
        self.running.iter().filter_map(|id| seqs[id].lora)
    }

    /// The adapter of each waiting request, in queue order (`None`: no adapter).
    pub fn waiting_loras<'a>(
        &'a self,
        seqs: &'a HashMap<SeqId, Sequence>,
    ) -> impl Iterator<Item = Option<AdapterId>> + 'a {
        self.waiting.iter().map(|id| seqs[id].lora)
    }

    /// Removes a finished or aborted sequence from the queues. Its blocks are freed by the caller.
    pub fn remove(&mut self, id: SeqId) {
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
    }

    /// `is_ready`: whether an adapter is in host memory, so a step may use it.
    pub fn schedule(
        &mut self,
        seqs: &mut HashMap<SeqId, Sequence>,
        blocks: &mut BlockManager,
        is_ready: &dyn Fn(AdapterId) -> bool,
    ) -> &Schedule {
        self.out.scheduled.clear();
        self.out.preempted.clear();
        self.out.admitted.clear();
        let mut budget = self.cfg.max_num_batched_tokens;

        // 1. Running sequences: a decode token or the next prompt chunk each; the newest yield
        // their blocks when the cache is full.
        let mut i = 0;
        'running: while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let n = loop {
                let seq = seqs.get_mut(&id).expect("running seq exists");
                let n = self.cfg.chunk(seq.len() - seq.num_computed_tokens, budget);
                if blocks.grow(&mut seq.block_table, seq.num_computed_tokens + n) {
                    break n;
                }
                if self.release_waiting_blocks(seqs, blocks) {
                    continue;
                }
                let victim = self.running.pop().expect("running is not empty");
                let v = seqs.get_mut(&victim).expect("victim exists");
                blocks.free(&mut v.block_table);
                v.num_computed_tokens = 0;
                v.metrics.num_preemptions += 1;
                self.waiting.push_front(victim);
                self.out.preempted.push(victim);
                if victim == id {
                    break 'running;
                }
            };
            self.out.scheduled.push(ScheduledSeq {
                id,
                num_new_tokens: n,
            });
            budget -= n;
            i += 1;
        }
        if !self.out.preempted.is_empty() {
            return &self.out;
        }

        // 2. Admit waiting requests, first come first served, passing over those whose adapter
        // cannot run yet; the last may get a chunk.
        self.step_loras.clear();
        for id in &self.running {
            if let Some(a) = seqs[id].lora {
                if !self.step_loras.contains(&a) {
                    self.step_loras.push(a);
                }
            }
        }
        self.passed_over.clear();
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            let seq = seqs.get_mut(&id).expect("waiting seq exists");
            if let Some(a) = seq.lora {
                let is_new = !self.step_loras.contains(&a);
                if !is_ready(a) || (is_new && self.step_loras.len() >= self.cfg.max_loras) {
                    if seq.metrics.num_times_passed_over >= self.cfg.max_times_passed_over {
                        // Waited long enough: nobody behind it goes first any more.
                        self.waiting.push_front(id);
                        break;
                    }
                    self.passed_over.push((id, self.out.admitted.len()));
                    continue;
                }
            }
            // Zero computed tokens, except for a forked choice that kept its shared blocks.
            let mut n = self.cfg.chunk(seq.len() - seq.num_computed_tokens, budget);
            if !blocks.grow(&mut seq.block_table, seq.num_computed_tokens + n) {
                self.waiting.push_front(id);
                if !self.release_waiting_blocks(seqs, blocks) {
                    break;
                }
                self.waiting.pop_front();
                let seq = seqs.get_mut(&id).expect("waiting seq exists");
                n = self.cfg.chunk(seq.len(), budget);
                if !blocks.grow(&mut seq.block_table, n) {
                    self.waiting.push_front(id);
                    break;
                }
            }
            let seq = seqs.get_mut(&id).expect("waiting seq exists");
            if let Some(a) = seq.lora {
                if !self.step_loras.contains(&a) {
                    self.step_loras.push(a);
                }
            }
            budget -= n;
            self.running.push(id);
            self.out.scheduled.push(ScheduledSeq {
                id,
                num_new_tokens: n,
            });
            self.out.admitted.push(id);
        }
        // Passed over: skipped, and someone behind it was admitted.
        for &(id, num_admitted_before) in self.passed_over.iter().rev() {
            if self.out.admitted.len() > num_admitted_before {
                let seq = seqs.get_mut(&id).expect("waiting seq exists");
                seq.metrics.num_times_passed_over += 1;
            }
            self.waiting.push_front(id);
        }
        &self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;
    use crate::sequence::RequestMetrics;
    use rand::SeedableRng;

    fn seq(prompt_len: usize, lora: Option<u32>) -> Sequence {
        Sequence {
            request_id: "r".into(),
            prompt_token_ids: vec![1; prompt_len],
            output_token_ids: vec![],
            params: SamplingParams::greedy(8),
            lora: lora.map(AdapterId),
            block_table: vec![],
            num_computed_tokens: 0,
            rng: rand::rngs::StdRng::seed_from_u64(0),
            metrics: RequestMetrics::new(std::time::Instant::now()),
            prompt_logprobs: vec![],
            index: 0,
            num_forks: 0,
            matcher: None,
        }
    }

    /// Plays the engine's part after a step: every scheduled sequence computed its tokens, and
    /// those that reached their last token got a new one.
    fn advance(s: &Scheduler, seqs: &mut HashMap<SeqId, Sequence>) {
        for sc in &s.out.scheduled {
            let q = seqs.get_mut(&sc.id).unwrap();
            q.num_computed_tokens += sc.num_new_tokens;
            if q.num_computed_tokens == q.len() {
                q.output_token_ids.push(7);
            }
        }
    }

    /// `(id, num_new_tokens)` of each sequence the last `schedule` ran.
    fn planned(s: &Scheduler) -> Vec<(u64, usize)> {
        s.out
            .scheduled
            .iter()
            .map(|x| (x.id.0, x.num_new_tokens))
            .collect()
    }

    /// Requests 0.. with these prompt lengths and adapters, waiting in that order.
    fn setup_with(
        prompt_lens: &[usize],
        loras: &[Option<u32>],
        max_num_batched_tokens: usize,
        max_loras: usize,
    ) -> (Scheduler, HashMap<SeqId, Sequence>) {
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens,
            max_loras,
            max_times_passed_over: 64,
            long_prefill_token_threshold: 0,
        });
        let mut seqs = HashMap::new();
        for (i, (&n, l)) in prompt_lens.iter().zip(loras).enumerate() {
            seqs.insert(SeqId(i as u64), seq(n, *l));
            s.add(SeqId(i as u64));
        }
        (s, seqs)
    }

    fn setup(
        loras: &[Option<u32>],
        prompt_len: usize,
        max_loras: usize,
    ) -> (Scheduler, HashMap<SeqId, Sequence>) {
        setup_with(&vec![prompt_len; loras.len()], loras, 64, max_loras)
    }

    #[test]
    fn max_loras_holds_back_without_preempting() {
        // adapters 1, 2, 1, none, 3 with max_loras 2: the request for adapter 3 waits.
        let (mut s, mut seqs) = setup(&[Some(1), Some(2), Some(1), None, Some(3)], 4, 2);
        let mut bm = BlockManager::new(64, 4);
        let ids: Vec<u64> = s
            .schedule(&mut seqs, &mut bm, &|_| true)
            .scheduled
            .iter()
            .map(|x| x.id.0)
            .collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
        assert_eq!(s.num_waiting(), 1);
        advance(&s, &mut seqs);
        let sched = s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(sched.scheduled.len(), 4, "running keep decoding");
        assert!(sched.preempted.is_empty());
        assert!(sched.scheduled.iter().all(|x| x.num_new_tokens == 1));
        // once adapter 2's request finishes, adapter 3 gets in
        advance(&s, &mut seqs);
        s.remove(SeqId(1));
        bm.free(&mut seqs.get_mut(&SeqId(1)).unwrap().block_table);
        let sched = s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(sched.admitted, vec![SeqId(4)]);
    }

    #[test]
    fn passed_over_request_keeps_its_place() {
        let (mut s, mut seqs) = setup(&[Some(1), Some(2), None], 4, 1);
        let mut bm = BlockManager::new(64, 4);
        let sched = s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(sched.admitted, vec![SeqId(0), SeqId(2)]);
        assert_eq!(s.waiting.front(), Some(&SeqId(1)));
    }

    #[test]
    fn preempts_newest_when_blocks_run_out_and_recomputes() {
        // 3 blocks of 4 tokens; two prompts of 4 tokens fill 2 blocks; decoding needs more.
        let (mut s, mut seqs) = setup(&[None, None], 4, 1);
        let mut bm = BlockManager::new(3, 4);
        assert_eq!(s.schedule(&mut seqs, &mut bm, &|_| true).scheduled.len(), 2);
        advance(&s, &mut seqs);
        // seq 0 grows into block 3; seq 1 cannot grow: it is preempted.
        let sched = s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(
            sched.scheduled,
            vec![ScheduledSeq {
                id: SeqId(0),
                num_new_tokens: 1
            }]
        );
        assert_eq!(sched.preempted, vec![SeqId(1)]);
        assert_eq!(seqs[&SeqId(1)].num_computed_tokens, 0);
        assert!(seqs[&SeqId(1)].block_table.is_empty());
        advance(&s, &mut seqs);
        s.remove(SeqId(0));
        bm.free(&mut seqs.get_mut(&SeqId(0)).unwrap().block_table);
        // seq 1 comes back and recomputes prompt + its one output token
        let sched = s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(
            sched.scheduled,
            vec![ScheduledSeq {
                id: SeqId(1),
                num_new_tokens: 5
            }]
        );
    }

    #[test]
    fn respects_max_num_seqs_and_token_budget() {
        let (mut s, mut seqs) = setup(&[None; 12], 10, 1);
        let mut bm = BlockManager::new(100, 4);
        // budget 64 tokens: 6 prompts of 10 and 4 tokens of a 7th
        s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(planned(&s).len(), 7);
        assert_eq!(planned(&s)[6], (6, 4));
        advance(&s, &mut seqs);
        // 6 decodes, the 7th's last 6 tokens, and one more prompt (max_num_seqs 8)
        let sched = s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(sched.admitted, vec![SeqId(7)]);
        assert_eq!(s.num_running(), 8);
        assert_eq!(planned(&s)[6..], [(6, 6), (7, 10)]);
    }

    #[test]
    fn long_prompt_is_prefilled_in_chunks() {
        let (mut s, mut seqs) = setup_with(&[20], &[None], 8, 1);
        let mut bm = BlockManager::new(16, 4);
        let mut steps = Vec::new();
        for _ in 0..4 {
            s.schedule(&mut seqs, &mut bm, &|_| true);
            advance(&s, &mut seqs);
            let q = &seqs[&SeqId(0)];
            steps.push((planned(&s), q.block_table.len(), q.output_token_ids.len()));
        }
        // Blocks hold the tokens computed so far; the token comes after the last chunk.
        assert_eq!(
            steps,
            vec![
                (vec![(0, 8)], 2, 0),
                (vec![(0, 8)], 4, 0),
                (vec![(0, 4)], 5, 1),
                (vec![(0, 1)], 6, 2),
            ]
        );
    }

    #[test]
    fn decodes_keep_running_while_a_long_prompt_is_chunked() {
        let (mut s, mut seqs) = setup_with(&[2, 2, 2], &[None; 3], 8, 1);
        let mut bm = BlockManager::new(64, 4);
        s.schedule(&mut seqs, &mut bm, &|_| true);
        advance(&s, &mut seqs);
        seqs.insert(SeqId(3), seq(30, None));
        s.add(SeqId(3));
        // 8 tokens a step: the three decodes, then 5 of the prompt, for 6 steps.
        for step in 0..6 {
            s.schedule(&mut seqs, &mut bm, &|_| true);
            assert_eq!(planned(&s), vec![(0, 1), (1, 1), (2, 1), (3, 5)], "step {step}");
            assert_eq!(seqs[&SeqId(3)].output_token_ids.len(), 0);
            advance(&s, &mut seqs);
        }
        assert_eq!(seqs[&SeqId(3)].output_token_ids.len(), 1);
        assert!((0..3).all(|i| seqs[&SeqId(i)].output_token_ids.len() == 7));
    }

    #[test]
    fn long_prefill_token_threshold_bounds_each_prompts_share_of_a_step() {
        // 16 tokens a step, at most 5 of one prompt: two decodes, then the 12-token prompt in
        // chunks of 5, 5, 2, and beside it the 3-token prompt admitted whole (below the bound).
        let (mut s, mut seqs) = setup_with(&[2, 2], &[None; 2], 16, 1);
        s.cfg.long_prefill_token_threshold = 5;
        let mut bm = BlockManager::new(64, 4);
        s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(planned(&s), vec![(0, 2), (1, 2)]);
        advance(&s, &mut seqs);
        for (id, len) in [(2, 12), (3, 3)] {
            seqs.insert(SeqId(id), seq(len, None));
            s.add(SeqId(id));
        }
        s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(planned(&s), vec![(0, 1), (1, 1), (2, 5), (3, 3)]);
        advance(&s, &mut seqs);
        // The partial prompt keeps its bound among the running; the short one now decodes
        // after it.
        s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(planned(&s), vec![(0, 1), (1, 1), (2, 5), (3, 1)]);
        advance(&s, &mut seqs);
        s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(planned(&s), vec![(0, 1), (1, 1), (2, 2), (3, 1)]);
        advance(&s, &mut seqs);
        assert_eq!(seqs[&SeqId(2)].output_token_ids.len(), 1);
        // Without the bound the budget alone decides: 16 tokens of the prompt in one step.
        let (mut s, mut seqs) = setup_with(&[40], &[None], 16, 1);
        s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(planned(&s), vec![(0, 16)]);
    }

    #[test]
    fn last_admitted_gets_a_partial_chunk() {
        let (mut s, mut seqs) = setup_with(&[4, 4, 4, 4], &[None; 4], 10, 1);
        let mut bm = BlockManager::new(64, 4);
        s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(planned(&s), vec![(0, 4), (1, 4), (2, 2)]);
        assert_eq!(s.out.admitted, vec![SeqId(0), SeqId(1), SeqId(2)]);
        assert_eq!(s.num_waiting(), 1);
        advance(&s, &mut seqs);
        // The partial one finishes its prompt among the running, before anyone is admitted.
        s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(planned(&s), vec![(0, 1), (1, 1), (2, 2), (3, 4)]);
        assert_eq!(s.out.admitted, vec![SeqId(3)]);
    }

    #[test]
    fn preempted_partial_prefill_restarts_from_zero() {
        // 4 blocks of 4 tokens. Seq 0 decodes; seq 1, partially prefilled, is the newest and
        // loses its blocks when the two no longer fit.
        let (mut s, mut seqs) = setup_with(&[4, 20], &[None; 2], 8, 1);
        let mut bm = BlockManager::new(4, 4);
        s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(planned(&s), vec![(0, 4), (1, 4)]);
        advance(&s, &mut seqs);
        // seq 0 takes its 2nd block; seq 1's chunk of 7 would need 2 more, 1 is free
        s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(planned(&s), vec![(0, 1)]);
        assert_eq!(s.out.preempted, vec![SeqId(1)]);
        let q = &seqs[&SeqId(1)];
        assert_eq!((q.num_computed_tokens, q.block_table.len()), (0, 0));
        assert_eq!(q.metrics.num_preemptions, 1);
        assert_eq!(bm.num_free(), 2);
        advance(&s, &mut seqs);
        s.remove(SeqId(0));
        bm.free(&mut seqs.get_mut(&SeqId(0)).unwrap().block_table);
        s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(planned(&s), vec![(1, 8)], "back from token 0");
        assert_eq!(s.out.admitted, vec![SeqId(1)]);
    }

    #[test]
    fn max_loras_counts_a_partially_prefilled_sequence() {
        // max_loras 1: while adapter 1's prompt is being chunked, adapter 2 waits and the
        // request without adapter takes the rest of the budget.
        let (mut s, mut seqs) = setup_with(&[12, 4, 4], &[Some(1), Some(2), None], 8, 1);
        let mut bm = BlockManager::new(64, 4);
        s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(planned(&s), vec![(0, 8)]);
        advance(&s, &mut seqs);
        s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(planned(&s), vec![(0, 4), (2, 4)]);
        assert!(s.out.preempted.is_empty());
        assert_eq!(s.waiting.front(), Some(&SeqId(1)));
    }

    #[test]
    fn ready_adapters_go_first_and_the_unready_keep_their_place() {
        // adapter 1 is still loading: the requests behind it go first
        let (mut s, mut seqs) = setup(&[Some(1), Some(2), None, Some(1)], 4, 4);
        let mut bm = BlockManager::new(64, 4);
        let sched = s.schedule(&mut seqs, &mut bm, &|a| a != AdapterId(1));
        assert_eq!(sched.admitted, vec![SeqId(1), SeqId(2)]);
        assert_eq!(s.waiting, [SeqId(0), SeqId(3)]);
        assert_eq!(seqs[&SeqId(0)].metrics.num_times_passed_over, 1);
        advance(&s, &mut seqs);
        // loaded: both join, in order
        let sched = s.schedule(&mut seqs, &mut bm, &|_| true);
        assert_eq!(sched.admitted, vec![SeqId(0), SeqId(3)]);
    }

    /// A request whose adapter takes 8 steps to load, with requests without adapters arriving
    /// every step: they overtake it twice (max_times_passed_over 2), then wait behind it; it is
    /// admitted, first, the step its adapter is ready.
    #[test]
    fn a_slow_load_is_overtaken_a_bounded_number_of_times() {
        let (mut s, mut seqs) = setup(&[Some(1)], 2, 4);
        s.cfg.max_times_passed_over = 2;
        s.cfg.max_num_seqs = 16;
        let mut bm = BlockManager::new(256, 4);
        let mut admitted = Vec::new();
        for step in 0..10u64 {
            let id = SeqId(1 + step);
            seqs.insert(id, seq(2, None));
            s.add(id);
            let is_loaded = step >= 8;
            let sched = s.schedule(&mut seqs, &mut bm, &|_| is_loaded);
            admitted.push(sched.admitted.iter().map(|x| x.0).collect::<Vec<_>>());
            advance(&s, &mut seqs);
        }
        let expected: Vec<Vec<u64>> = [vec![1], vec![2]]
            .into_iter()
            .chain(std::iter::repeat_n(vec![], 6))
            .chain([(0..=9).filter(|&i| i != 1 && i != 2).collect(), vec![10]])
            .collect();
        assert_eq!(admitted, expected);
        assert_eq!(seqs[&SeqId(0)].metrics.num_times_passed_over, 2);
    }

    /// A request whose adapter cannot get a slot (max_loras 1, adapter 1 always busy with new
    /// arrivals) is passed over `max_times_passed_over` times, then nothing behind it is
    /// admitted; it gets in once the running requests finish.
    #[test]
    fn passing_over_is_bounded() {
        const MAX_PASSED: u32 = 3;
        let (mut s, mut seqs) = setup(&[Some(1), Some(2)], 2, 1);
        s.cfg.max_times_passed_over = MAX_PASSED;
        let mut bm = BlockManager::new(256, 4);
        let mut admitted_order = Vec::new();
        for step in 0..40 {
            // a new request for the busy adapter every step
            let id = SeqId(2 + step as u64);
            seqs.insert(id, seq(2, Some(1)));
            s.add(id);
            let sched = s.schedule(&mut seqs, &mut bm, &|_| true);
            admitted_order.extend(sched.admitted.iter().map(|x| (x.0, step)));
            assert!(seqs[&SeqId(1)].metrics.num_times_passed_over <= MAX_PASSED);
            advance(&s, &mut seqs);
            let done: Vec<SeqId> = (s.running.iter().copied())
                .filter(|id| seqs[id].output_token_ids.len() == 3)
                .collect();
            for id in done {
                s.remove(id);
                bm.free(&mut seqs.get_mut(&id).unwrap().block_table);
            }
        }
        let (_, x_step) = *admitted_order.iter().find(|(id, _)| *id == 1).expect("admitted");
        assert_eq!(seqs[&SeqId(1)].metrics.num_times_passed_over, MAX_PASSED);
        // passed over in steps 0..MAX_PASSED; from then on nobody behind it gets in before it
        let overtaking = admitted_order.iter().filter(|&&(id, st)| id > 1 && st < x_step);
        assert_eq!(overtaking.map(|&(_, st)| st).max(), Some(MAX_PASSED as usize - 1));
        assert!(
            x_step > MAX_PASSED as usize,
            "it waited for adapter 1's requests to finish"
        );
    }

    /// Random prompts, a small budget and a small cache: every step stays within the budget,
    /// each running sequence's blocks hold its computed tokens, and everything finishes (no
    /// deadlock, no starvation); from seed 20 on also with a `long_prefill_token_threshold`.
    #[test]
    fn random_workloads_finish_within_budget() {
        use rand::{Rng, SeedableRng};
        const MAX_MODEL_LEN: usize = 24;
        const NUM_OUTPUT: usize = 4;
        let (mut num_preempted, mut num_partial) = (0, 0);
        for seed in 0..40 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let budget = rng.random_range(1..=9);
            let threshold = if seed >= 20 { rng.random_range(1..=4) } else { 0 };
            let lens: Vec<usize> = (0..12)
                .map(|_| rng.random_range(1..=MAX_MODEL_LEN - NUM_OUTPUT))
                .collect();
            let loras: Vec<Option<u32>> = (0..12)
                .map(|_| rng.random_range(0..3u32).checked_sub(1))
                .collect();
            let (mut s, mut seqs) = setup_with(&lens, &loras, budget, 1);
            s.cfg.max_num_seqs = budget.min(4);
            s.cfg.long_prefill_token_threshold = threshold;
            // Enough blocks for one sequence of max_model_len, as the engine guarantees.
            let mut bm = BlockManager::new(MAX_MODEL_LEN.div_ceil(4), 4);
            let mut num_steps = 0;
            while s.has_unfinished() {
                num_steps += 1;
                assert!(num_steps < 1000, "seed {seed}: no progress");
                s.schedule(&mut seqs, &mut bm, &|_| true);
                let total: usize = s.out.scheduled.iter().map(|x| x.num_new_tokens).sum();
                assert!(total <= budget, "seed {seed}: {total} tokens > budget {budget}");
                // Only the last one scheduled may stop short of its last token, or one cut at
                // the threshold; none takes more than the threshold.
                let ends = |x: &ScheduledSeq| {
                    seqs[&x.id].num_computed_tokens + x.num_new_tokens == seqs[&x.id].len()
                        || (threshold > 0 && x.num_new_tokens == threshold)
                };
                let n = s.out.scheduled.len();
                assert!(
                    s.out.scheduled.iter().take(n.saturating_sub(1)).all(ends),
                    "seed {seed}"
                );
                if threshold > 0 {
                    assert!(
                        s.out.scheduled.iter().all(|x| x.num_new_tokens <= threshold),
                        "seed {seed}"
                    );
                }
                num_preempted += s.out.preempted.len();
                num_partial += (s.out.scheduled.iter())
                    .filter(|x| seqs[&x.id].num_computed_tokens + x.num_new_tokens < seqs[&x.id].len())
                    .count();
                advance(&s, &mut seqs);
                for &id in &s.running {
                    let q = &seqs[&id];
                    assert_eq!(q.block_table.len(), bm.blocks_for(q.num_computed_tokens));
                }
                let done: Vec<SeqId> = (s.running.iter().copied())
                    .filter(|id| seqs[id].output_token_ids.len() == NUM_OUTPUT)
                    .collect();
                for id in done {
                    s.remove(id);
                    bm.free(&mut seqs.get_mut(&id).unwrap().block_table);
                }
            }
            assert_eq!(bm.num_free(), bm.num_blocks(), "seed {seed}");
        }
        assert!(
            num_preempted > 0 && num_partial > 0,
            "the workloads chunk and preempt"
        );
    }
}
