//! Deterministic randomness for training-time ops (dropout). A run gives each micro-batch a
//! seed ([`crate::Ctx::train`]); each draw derives from (that seed, a draw counter), so a
//! resumed run replays identical masks without saving any generator state.

use std::sync::atomic::{AtomicU64, Ordering};

/// The random stream of one forward pass: a seed and the number of draws taken from it.
#[derive(Debug, Default)]
pub struct Stream {
    seed: u64,
    counter: AtomicU64,
}

impl Stream {
    /// Draws after this depend only on `seed` and the order of draws.
    pub fn new(seed: u64) -> Self {
        Stream {
            seed,
            counter: AtomicU64::new(0),
        }
    }

    /// Where the draws stand: restoring it replays the same masks (gradient checkpointing
    /// recomputes a layer's forward with the dropout it had).
    pub fn snapshot(&self) -> (u64, u64) {
        (self.seed, self.counter.load(Ordering::Relaxed))
    }

    /// Back to a snapshot of this stream.
    pub fn restore(&self, state: (u64, u64)) {
        debug_assert_eq!(state.0, self.seed, "a snapshot of another stream");
        self.counter.store(state.1, Ordering::Relaxed);
    }

    /// A fresh seed for the next random draw.
    pub fn next_seed(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        splitmix(self.seed ^ splitmix(n.wrapping_add(0x9E37_79B9)))
    }
}

pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
