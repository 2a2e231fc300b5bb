//! Fixed-size KV-cache blocks: a free list and per-sequence block tables. No prefix sharing:
//! a block belongs to exactly one sequence.

/// Index of a KV-cache block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockId(pub u32);

pub struct BlockManager {
    block_size: usize,
    num_blocks: usize,
    free: Vec<BlockId>,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Pop from the end: hand out low ids first.
        let free = (0..num_blocks as u32).rev().map(BlockId).collect();
        BlockManager {
            block_size,
            num_blocks,
            free,
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
            table.push(self.free.pop().expect("checked by can_grow"));
        }
        true
    }

    pub fn free(&mut self, table: &mut Vec<BlockId>) {
        self.free.extend(table.drain(..).rev());
        assert!(self.free.len() <= self.num_blocks, "a block was freed twice");
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
}
