//! Which adapter each of the `max_loras` device slots holds, and which slot a newly activated
//! adapter takes: a free one, else the least recently used one that the step does not need.
//! Lookups are hashed and the use order is kept sorted, so a step costs its own adapters (times
//! a logarithm), never a scan of every slot: `max_loras` in the hundreds stays cheap.

use std::collections::{BTreeSet, HashMap};

use super::{AdapterId, LoraSlot};

pub struct SlotTable {
    slot_of: HashMap<AdapterId, LoraSlot>,
    /// `[max_loras]` the adapter in each slot and its last use
    held: Vec<Option<(AdapterId, u64)>>,
    /// Empty slots, the lowest last (taken first).
    free: Vec<LoraSlot>,
    /// `(last use, slot)` of every filled slot, oldest first
    by_use: BTreeSet<(u64, u32)>,
}

impl SlotTable {
    pub fn new(max_loras: usize) -> Self {
        SlotTable {
            slot_of: HashMap::new(),
            held: vec![None; max_loras],
            free: (0..max_loras as u32).rev().map(LoraSlot).collect(),
            by_use: BTreeSet::new(),
        }
    }

    pub fn num_filled(&self) -> usize {
        self.slot_of.len()
    }

    /// The slot holding `id`, marked used at `tick` (ticks only grow).
    pub fn touch(&mut self, id: AdapterId, tick: u64) -> Option<LoraSlot> {
        let slot = *self.slot_of.get(&id)?;
        let (_, last) = self.held[slot.index()].expect("slot_of and held agree");
        self.by_use.remove(&(last, slot.0));
        self.by_use.insert((tick, slot.0));
        self.held[slot.index()] = Some((id, tick));
        Some(slot)
    }

    /// The slot a new adapter should take: a free one, else the least recently used one whose
    /// adapter `is_needed` rejects. Skips at most the needed ones.
    pub fn victim(&self, is_needed: impl Fn(AdapterId) -> bool) -> Option<LoraSlot> {
        if let Some(&s) = self.free.last() {
            return Some(s);
        }
        (self.by_use.iter())
            .map(|&(_, s)| LoraSlot(s))
            .find(|s| self.held[s.index()].is_some_and(|(a, _)| !is_needed(a)))
    }

    /// Puts `id` in `slot` (from [`Self::victim`]), replacing what it held.
    pub fn assign(&mut self, slot: LoraSlot, id: AdapterId, tick: u64) {
        self.clear(slot);
        if self.free.last() == Some(&slot) {
            self.free.pop();
        } else {
            self.free.retain(|&s| s != slot);
        }
        self.held[slot.index()] = Some((id, tick));
        self.slot_of.insert(id, slot);
        self.by_use.insert((tick, slot.0));
    }

    /// Empties `slot` (its contents are gone or unknown).
    pub fn clear(&mut self, slot: LoraSlot) {
        if let Some((a, last)) = self.held[slot.index()].take() {
            self.slot_of.remove(&a);
            self.by_use.remove(&(last, slot.0));
            self.free.push(slot);
        }
    }

    /// Empties the slot holding `id`, if any.
    pub fn remove(&mut self, id: AdapterId) {
        if let Some(&s) = self.slot_of.get(&id) {
            self.clear(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every slot agrees with the index and the use order.
    fn check(t: &SlotTable) {
        let filled: Vec<_> = t.held.iter().flatten().collect();
        assert_eq!(filled.len(), t.slot_of.len());
        assert_eq!(filled.len(), t.by_use.len());
        assert_eq!(filled.len() + t.free.len(), t.held.len());
        for (&a, &s) in &t.slot_of {
            let (held, tick) = t.held[s.index()].unwrap();
            assert_eq!(held, a);
            assert!(t.by_use.contains(&(tick, s.0)));
        }
    }

    #[test]
    fn free_slots_first_then_the_least_recently_used_one_not_needed() {
        let id = AdapterId;
        let mut t = SlotTable::new(256);
        // Fill every slot: free ones go lowest first.
        for i in 0..256u32 {
            let s = t.victim(|_| false).unwrap();
            assert_eq!(s, LoraSlot(i));
            t.assign(s, id(i + 1), u64::from(i));
        }
        check(&t);
        assert_eq!(t.num_filled(), 256);
        // Adapter 1 is used again: adapter 2 is now the oldest.
        assert_eq!(t.touch(id(1), 1000), Some(LoraSlot(0)));
        assert_eq!(t.victim(|_| false), Some(LoraSlot(1)));
        // ...unless the step needs 2 and 3: then 4's slot.
        assert_eq!(t.victim(|a| a == id(2) || a == id(3)), Some(LoraSlot(3)));
        t.assign(LoraSlot(3), id(900), 1001);
        assert_eq!(t.touch(id(4), 1002), None, "replaced");
        assert_eq!(t.touch(id(900), 1003), Some(LoraSlot(3)));
        check(&t);
        // A removed adapter's slot is taken before any eviction.
        t.remove(id(200));
        assert_eq!(t.num_filled(), 255);
        assert_eq!(t.victim(|_| false), Some(LoraSlot(199)));
        t.clear(LoraSlot(5));
        assert_eq!(t.victim(|_| false), Some(LoraSlot(5)));
        t.assign(LoraSlot(199), id(901), 1004);
        assert_eq!(t.victim(|_| false), Some(LoraSlot(5)));
        check(&t);
        // Everything needed: no slot.
        assert_eq!(t.victim(|_| true).map(|_| ()), Some(()), "slot 5 is free");
        t.assign(LoraSlot(5), id(902), 1005);
        assert_eq!(t.victim(|_| true), None);
        check(&t);
    }
}
