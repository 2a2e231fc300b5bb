//! Fixed-size KV-cache blocks: a free list, per-sequence block tables and a reference count per
//! block. A block is shared only by the choices of one request (`n` > 1): they fork from the
//! first after its prompt ran, sharing the prompt's full blocks, which nobody writes again
//! (each choice writes from the block after them on); a block returns to the free list when its
//! last holder frees it.

/// Index of a KV-cache block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockId(pub u32);

pub struct BlockManager {
    block_size: usize,
    num_blocks: usize,
    free: Vec<BlockId>,
    /// `[num_blocks]` block tables holding each block
    ref_counts: Vec<u32>,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Pop from the end: hand out low ids first.
        let free = (0..num_blocks as u32).rev().map(BlockId).collect();
        BlockManager {
            block_size,
            num_blocks,
            free,
            ref_counts: vec![0; num_blocks],
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    pub fn can_grow(&self, table: &[BlockId], num_tokens: usize) -> bool {
        self.blocks_for(num_tokens).saturating_sub(table.len()) <= self.free.len()
    }

    /// Grows `table` to hold `num_tokens` tokens; false (and no change) if blocks run out.
    pub fn grow(&mut self, table: &mut Vec<BlockId>, num_tokens: usize) -> bool {
        if !self.can_grow(table, num_tokens) {
            return false;
        }
        while table.len() < self.blocks_for(num_tokens) {
            let b = self.free.pop().expect("checked by can_grow");
            self.ref_counts[b.0 as usize] = 1;
            table.push(b);
        }
        true
    }

    /// A new table holding `table`'s first `num_blocks` blocks too (shared, never written
    /// again: see the module doc).
    pub fn fork(&mut self, table: &[BlockId], num_blocks: usize) -> Vec<BlockId> {
        let shared = &table[..num_blocks];
        for b in shared {
            self.ref_counts[b.0 as usize] += 1;
        }
        shared.to_vec()
    }

    pub fn free(&mut self, table: &mut Vec<BlockId>) {
        for b in table.drain(..).rev() {
            let count = &mut self.ref_counts[b.0 as usize];
            assert!(*count > 0, "a block was freed twice");
            *count -= 1;
            if *count == 0 {
                self.free.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_blocks_and_refuses_when_full() {
        let mut bm = BlockManager::new(4, 16);
        let mut a = Vec::new();
        assert!(bm.grow(&mut a, 17));
        assert_eq!(a.len(), 2);
        assert!(bm.grow(&mut a, 32));
        assert_eq!(a.len(), 2, "32 tokens still fit in two blocks");
        let mut b = Vec::new();
        assert!(!bm.grow(&mut b, 49), "needs 4 blocks, 2 free");
        assert!(b.is_empty());
        assert!(bm.grow(&mut b, 32));
        assert_eq!(bm.num_free(), 0);
        bm.free(&mut a);
        assert_eq!(bm.num_free(), 2);
        assert!(a.is_empty());
    }

    #[test]
    fn forked_blocks_return_when_their_last_holder_frees_them() {
        let mut bm = BlockManager::new(6, 4);
        let mut parent = Vec::new();
        assert!(bm.grow(&mut parent, 10)); // 3 blocks
        let mut child = bm.fork(&parent, 2);
        assert_eq!(child, parent[..2]);
        assert_eq!(bm.num_free(), 3, "forking takes no block");
        assert!(bm.grow(&mut child, 10), "the child's own third block");
        assert_eq!(bm.num_free(), 2);
        assert_ne!(child[2], parent[2]);
        bm.free(&mut parent);
        assert_eq!(bm.num_free(), 3, "only the parent's own block came back");
        bm.free(&mut child);
        assert_eq!(bm.num_free(), 6);
    }
}
