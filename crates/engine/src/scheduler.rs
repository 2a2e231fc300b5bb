//! Continuous batching. Each step: every running sequence decodes one token (preempting the
//! newest running sequences, recompute-style, when KV blocks run out); then, if nothing was
//! preempted, waiting requests are admitted first come first served within `max_num_seqs`, the
//! token budget and the free blocks. A waiting request whose adapter would make the step use
//! more than `max_loras` distinct adapters is passed over (it keeps its place) and running
//! requests are never preempted for it. A prompt is prefilled in one step.
//!
//! Cannot deadlock: with nothing running, the first waiting request always fits — its adapter is
//! the only one, and the engine refused at `add_request` anything longer than `max_model_len`,
//! which fits both the token budget and the KV cache.

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
    passed_over: Vec<SeqId>,
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

    /// Removes a finished or aborted sequence from the queues. Its blocks are freed by the caller.
    pub fn remove(&mut self, id: SeqId) {
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
    }

    pub fn schedule(&mut self, seqs: &mut HashMap<SeqId, Sequence>, blocks: &mut BlockManager) -> &Schedule {
        self.out.scheduled.clear();
        self.out.preempted.clear();
        self.out.admitted.clear();
        let mut budget = self.cfg.max_num_batched_tokens;

        // 1. Running sequences decode; the newest yield their blocks when the cache is full.
        let mut i = 0;
        'running: while i < self.running.len() {
            let id = self.running[i];
            loop {
                let seq = seqs.get_mut(&id).expect("running seq exists");
                let len = seq.len();
                if blocks.grow(&mut seq.block_table, len) {
                    break;
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
            }
            let seq = &seqs[&id];
            let n = seq.len() - seq.num_computed_tokens;
            self.out.scheduled.push(ScheduledSeq {
                id,
                num_new_tokens: n,
            });
            budget = budget.saturating_sub(n);
            i += 1;
        }
        if !self.out.preempted.is_empty() {
            return &self.out;
        }

        // 2. Admit waiting requests, first come first served.
        self.step_loras.clear();
        for id in &self.running {
            if let Some(a) = seqs[id].lora {
                if !self.step_loras.contains(&a) {
                    self.step_loras.push(a);
                }
            }
        }
        self.passed_over.clear();
        while let Some(id) = self.waiting.pop_front() {
            if self.running.len() >= self.cfg.max_num_seqs {
                self.waiting.push_front(id);
                break;
            }
            let seq = seqs.get_mut(&id).expect("waiting seq exists");
            if let Some(a) = seq.lora {
                if !self.step_loras.contains(&a) && self.step_loras.len() >= self.cfg.max_loras {
                    self.passed_over.push(id);
                    continue;
                }
            }
            let n = seq.len();
            if n > budget || !blocks.grow(&mut seq.block_table, n) {
                self.waiting.push_front(id);
                break;
            }
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
        for &id in self.passed_over.iter().rev() {
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
            metrics: RequestMetrics {
                arrival_time: std::time::Instant::now(),
                first_scheduled_time: None,
                first_token_time: None,
                last_token_time: None,
                num_preemptions: 0,
            },
        }
    }

    /// Plays the engine's part after a step: every scheduled sequence computed its tokens and
    /// got one new token.
    fn advance(s: &Scheduler, seqs: &mut HashMap<SeqId, Sequence>) {
        for sc in &s.out.scheduled {
            let q = seqs.get_mut(&sc.id).unwrap();
            q.num_computed_tokens += sc.num_new_tokens;
            q.output_token_ids.push(7);
        }
    }

    fn setup(
        loras: &[Option<u32>],
        prompt_len: usize,
        max_loras: usize,
    ) -> (Scheduler, HashMap<SeqId, Sequence>) {
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            max_loras,
        });
        let mut seqs = HashMap::new();
        for (i, l) in loras.iter().enumerate() {
            seqs.insert(SeqId(i as u64), seq(prompt_len, *l));
            s.add(SeqId(i as u64));
        }
        (s, seqs)
    }

    #[test]
    fn max_loras_holds_back_without_preempting() {
        // adapters 1, 2, 1, none, 3 with max_loras 2: the request for adapter 3 waits.
        let (mut s, mut seqs) = setup(&[Some(1), Some(2), Some(1), None, Some(3)], 4, 2);
        let mut bm = BlockManager::new(64, 4);
        let ids: Vec<u64> = s
            .schedule(&mut seqs, &mut bm)
            .scheduled
            .iter()
            .map(|x| x.id.0)
            .collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
        assert_eq!(s.num_waiting(), 1);
        advance(&s, &mut seqs);
        let sched = s.schedule(&mut seqs, &mut bm);
        assert_eq!(sched.scheduled.len(), 4, "running keep decoding");
        assert!(sched.preempted.is_empty());
        assert!(sched.scheduled.iter().all(|x| x.num_new_tokens == 1));
        // once adapter 2's request finishes, adapter 3 gets in
        advance(&s, &mut seqs);
        s.remove(SeqId(1));
        bm.free(&mut seqs.get_mut(&SeqId(1)).unwrap().block_table);
        let sched = s.schedule(&mut seqs, &mut bm);
        assert_eq!(sched.admitted, vec![SeqId(4)]);
    }

    #[test]
    fn passed_over_request_keeps_its_place() {
        let (mut s, mut seqs) = setup(&[Some(1), Some(2), None], 4, 1);
        let mut bm = BlockManager::new(64, 4);
        let sched = s.schedule(&mut seqs, &mut bm);
        assert_eq!(sched.admitted, vec![SeqId(0), SeqId(2)]);
        assert_eq!(s.waiting.front(), Some(&SeqId(1)));
    }

    #[test]
    fn preempts_newest_when_blocks_run_out_and_recomputes() {
        // 3 blocks of 4 tokens; two prompts of 4 tokens fill 2 blocks; decoding needs more.
        let (mut s, mut seqs) = setup(&[None, None], 4, 1);
        let mut bm = BlockManager::new(3, 4);
        assert_eq!(s.schedule(&mut seqs, &mut bm).scheduled.len(), 2);
        advance(&s, &mut seqs);
        // seq 0 grows into block 3; seq 1 cannot grow: it is preempted.
        let sched = s.schedule(&mut seqs, &mut bm);
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
        let sched = s.schedule(&mut seqs, &mut bm);
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
        // budget 64 tokens: 6 prompts of 10
        assert_eq!(s.schedule(&mut seqs, &mut bm).scheduled.len(), 6);
        advance(&s, &mut seqs);
        // 6 decodes + 2 more prompts (max_num_seqs 8)
        let sched = s.schedule(&mut seqs, &mut bm);
        assert_eq!(sched.admitted.len(), 2);
        assert_eq!(s.num_running(), 8);
    }
}
