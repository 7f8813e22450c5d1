//! Deterministic randomness for training-time ops (dropout). A run sets a seed per step; each
//! draw derives from (step seed, draw counter), so a resumed run replays identical masks
//! without saving any generator state.

use std::cell::Cell;

thread_local! {
    static STEP_SEED: Cell<u64> = const { Cell::new(0) };
    static COUNTER: Cell<u64> = const { Cell::new(0) };
}

/// Start a new step: masks drawn after this depend only on `seed` and the order of draws.
pub fn set_step_seed(seed: u64) {
    STEP_SEED.with(|s| s.set(seed));
    COUNTER.with(|c| c.set(0));
}

/// Where the draws of this step stand: restoring it replays the same masks (gradient
/// checkpointing recomputes a layer's forward with the dropout it had).
pub fn snapshot() -> (u64, u64) {
    (STEP_SEED.with(|s| s.get()), COUNTER.with(|c| c.get()))
}

pub fn restore(state: (u64, u64)) {
    STEP_SEED.with(|s| s.set(state.0));
    COUNTER.with(|c| c.set(state.1));
}

/// A fresh seed for the next random draw of this step.
pub fn next_seed() -> u64 {
    let n = COUNTER.with(|c| {
        let v = c.get();
        c.set(v + 1);
        v
    });
    splitmix(STEP_SEED.with(|s| s.get()) ^ splitmix(n.wrapping_add(0x9E37_79B9)))
}

pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
