//! Prefix caching: the KV caches of finished sequences, kept so that a later prompt through the
//! same adapter that begins with the same tokens (a shared system prompt or few-shot examples, a
//! conversation's earlier turns and answers) goes on from there instead of reading them again,
//! as vLLM's automatic prefix caching does. Bounded in bytes; the least recently used go first.

use petal_models::KvCache;

struct Entry {
    adapter: String,
    /// the tokens whose positions the cache holds (after an input-side adapter's own)
    tokens: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    used: u64,
}

/// Finished sequences' caches, at most `budget` bytes of them.
pub(crate) struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    held: usize,
    tick: u64,
}

impl PrefixCache {
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            entries: Vec::new(),
            budget,
            held: 0,
            tick: 0,
        }
    }

    /// For `prompt` through `adapter`: a cache holding the longest beginning of it that one
    /// of the kept caches holds (its first `virtual_positions` positions, an input-side
    /// adapter's, and then the tokens), and how many of the prompt's tokens that is. At least
    /// the prompt's last token is left to read (its logits draw the first token).
    pub fn find(
        &mut self,
        adapter: &str,
        prompt: &[u32],
        virtual_positions: usize,
    ) -> Option<(KvCache, usize)> {
        let most = prompt.len().saturating_sub(1);
        let common = |e: &Entry| {
            e.tokens
                .iter()
                .zip(&prompt[..most])
                .take_while(|(a, b)| a == b)
                .count()
        };
        let (i, n) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.adapter == adapter)
            .map(|(i, e)| (i, common(e)))
            .max_by_key(|&(i, n)| (n, self.entries[i].used))?;
        if n == 0 {
            return None;
        }
        self.tick += 1;
        let e = &mut self.entries[i];
        e.used = self.tick;
        Some((e.cache.prefix(virtual_positions + n), n))
    }

    /// Keeps `cache`, which holds `tokens` through `adapter`. A kept cache whose tokens begin
    /// this one's is dropped (this one holds all it did); if a kept one's tokens begin with
    /// these, that one is kept instead. The least recently used go to stay within the budget.
    pub fn keep(&mut self, adapter: &str, tokens: &[u32], cache: KvCache) {
        if tokens.is_empty() {
            return;
        }
        self.tick += 1;
        let tick = self.tick;
        let same = |e: &Entry| e.adapter == adapter;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| same(e) && e.tokens.starts_with(tokens))
        {
            e.used = tick;
            return;
        }
        let bytes = cache.bytes();
        if bytes > self.budget {
            return;
        }
        self.drop_where(|e| same(e) && tokens.starts_with(&e.tokens));
        while self.held + bytes > self.budget {
            let oldest = self.entries.iter().map(|e| e.used).min();
            self.drop_where(|e| Some(e.used) == oldest);
        }
        self.held += bytes;
        self.entries.push(Entry {
            adapter: adapter.to_string(),
            tokens: tokens.to_vec(),
            cache,
            bytes,
            used: tick,
        });
    }

    /// Drops what was kept through `adapter` (it is detached: another by its name may follow).
    pub fn forget(&mut self, adapter: &str) {
        self.drop_where(|e| e.adapter == adapter);
    }

    fn drop_where(&mut self, gone: impl Fn(&Entry) -> bool) {
        let held = &mut self.held;
        self.entries.retain(|e| {
            let keep = !gone(e);
            if !keep {
                *held -= e.bytes;
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// a cache of `n` positions of one layer (room for 64), as a finished sequence leaves one
    fn cache(n: usize) -> KvCache {
        let x = candle_core::Tensor::zeros(
            (1, n, 2),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        KvCache::from_layers(&[(x.clone(), x)]).unwrap()
    }

    #[test]
    fn the_longest_common_beginning_is_found_and_the_least_recently_used_leaves_first() {
        let one = cache(6).bytes();
        let mut p = PrefixCache::new(2 * one);
        p.keep("a", &[1, 2, 3, 4, 5, 6], cache(6));
        p.keep("a", &[1, 2, 9], cache(3));
        p.keep("b", &[1, 2, 3, 4, 5, 6, 7], cache(7));
        // "b" pushed out the least recently used ([1..6] through "a")
        let (c, n) = p.find("a", &[1, 2, 3, 4], 0).unwrap();
        assert_eq!((n, c.len()), (2, 2));
        // the whole prompt is never taken: its last token is read to draw the first
        let (c, n) = p.find("b", &[1, 2, 3], 0).unwrap();
        assert_eq!((n, c.len()), (2, 2));
        // an input-side adapter's positions come first
        let (c, n) = p.find("b", &[1, 2, 3, 4, 8], 1).unwrap();
        assert_eq!((n, c.len()), (4, 5));
        assert!(p.find("a", &[7, 1], 0).is_none(), "nothing in common");
        assert!(p.find("c", &[1, 2, 3], 0).is_none(), "another adapter's");
        // a continuation replaces what it continues; a beginning of a kept one adds nothing
        p.keep("a", &[1, 2, 9, 9, 9], cache(5));
        p.keep("b", &[1, 2, 3], cache(3));
        assert_eq!(p.entries.len(), 2);
        assert_eq!(p.held, 2 * one);
        p.forget("b");
        assert_eq!((p.entries.len(), p.held), (1, one));
        assert_eq!(p.find("a", &[1, 2, 9, 9, 9, 9], 0).unwrap().1, 5);
        // larger than the whole budget: not kept
        let mut small = PrefixCache::new(one - 1);
        small.keep("a", &[1, 2], cache(2));
        assert!(small.entries.is_empty());
    }
}
