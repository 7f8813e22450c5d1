//! The KV cache: each layer's keys (rotated) and values at the front of buffers with room to
//! grow, so that a decoding step writes its own positions in place and copies nothing already
//! cached (appending by concatenation copied the whole cache every step and layer: a cost
//! that grew with the sequence). Full buffers double.

use candle_core::Tensor;
use petal_core::Result;

/// Positions a layer's buffers hold at least once made.
const MIN_ROOM: usize = 64;

/// Per-layer keys (rotated) and values seen so far, (b, t, kv_heads * d).
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    pub(super) kv: Vec<Option<Slot>>,
    /// Input tokens the passes filling it stand for at least (see `set_rope_span`)
    pub(super) span: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        KvCache {
            kv: vec![None; layers],
            span: 0,
        }
    }
    /// A cache holding each layer's keys and values (b, len, width), as passes over `len`
    /// positions would have left it.
    pub fn from_layers(layers: &[(Tensor, Tensor)]) -> Result<Self> {
        let mut c = KvCache::new(layers.len());
        for (slot, (k, v)) in c.kv.iter_mut().zip(layers) {
            Slot::push(slot, k, v)?;
        }
        Ok(c)
    }
    /// Rotate as one pass over `tokens` input tokens would: a prompt read in parts (a server's
    /// chunked prefill), or a context scored apart from its continuation, takes the RoPE tables
    /// of the whole (LongRoPE picks its factors by a pass's length; other scalings have one
    /// table and ignore this).
    pub fn set_rope_span(&mut self, tokens: usize) {
        self.span = tokens;
    }
    /// Layer `i`'s cached keys and values, if any.
    pub fn layer(&self, i: usize) -> Option<(Tensor, Tensor)> {
        self.kv.get(i)?.as_ref()?.cached().ok()
    }
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.kv
            .first()
            .and_then(|x| x.as_ref())
            .map_or(0, |s| s.len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A copy holding only the first `n` positions (all of them if fewer): a later prompt that
    /// begins as this cache's did goes on from it. It shares the buffers until its first write.
    pub fn prefix(&self, n: usize) -> KvCache {
        let mut c = self.clone();
        for s in c.kv.iter_mut().flatten() {
            s.len = s.len.min(n);
        }
        c
    }
    /// Bytes of the buffers it holds (their room past the cached positions included).
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.kv
            .iter()
            .flatten()
            .map(|s| size(&s.k) + size(&s.v))
            .sum()
    }
}

/// One layer's cache: positions `..len` of `k` and `v` (b, room, width) hold the keys and
/// values; the rest is room. Values only: no graph (an adapter's weights are variables, and a
/// graph kept here would keep every step's activations alive), so a pass through a cache
/// gives no gradient through the keys and values it reads back.
#[derive(Debug)]
pub(crate) struct Slot {
    k: Tensor,
    v: Tensor,
    len: usize,
    /// Whether this cache alone writes into the buffers. A copy (a cache cloned to continue a
    /// prompt several ways) shares them: it reads its positions there, which no one rewrites
    /// (writes go past the writer's own length only), and takes buffers of its own at its
    /// first write.
    owned: bool,
}

impl Clone for Slot {
    fn clone(&self) -> Self {
        Slot {
            k: self.k.clone(),
            v: self.v.clone(),
            len: self.len,
            owned: false,
        }
    }
}

impl Slot {
    /// Positions cached.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The cached keys and values, (b, len, width).
    pub(super) fn cached(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(1, 0, self.len)?,
            self.v.narrow(1, 0, self.len)?,
        ))
    }

    /// Appends `k` and `v` (b, t, width) to the layer's cache in `slot` and returns all its
    /// keys and values (b, len + t, width), without a graph.
    pub(super) fn push(
        slot: &mut Option<Slot>,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let len = slot.as_ref().map_or(0, |s| s.len);
        let need = len + k.dim(1)?;
        let room = match slot {
            Some(s) if s.owned => s.k.dim(1)?,
            _ => 0,
        };
        if need > room {
            let grown = |x: &Tensor| {
                let mut dims = x.dims().to_vec();
                dims[1] = need.next_power_of_two().max(MIN_ROOM);
                Tensor::zeros(dims, x.dtype(), x.device())
            };
            let (gk, gv) = (grown(k)?, grown(v)?);
            if let Some(s) = slot.as_ref().filter(|s| s.len > 0) {
                let (ck, cv) = s.cached()?;
                gk.slice_set(&ck.contiguous()?, 1, 0)?;
                gv.slice_set(&cv.contiguous()?, 1, 0)?;
            }
            *slot = Some(Slot {
                k: gk,
                v: gv,
                len,
                owned: true,
            });
        }
        let s = slot.as_mut().expect("made above");
        s.k.slice_set(&k.detach().contiguous()?, 1, len)?;
        s.v.slice_set(&v.detach().contiguous()?, 1, len)?;
        s.len = need;
        s.cached()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(t: usize, seed: u64) -> Tensor {
        let n = 2 * t * 3;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i as u64 * 7919 + seed * 104729) % 997) as f32)
            .collect();
        Tensor::from_vec(x, (2, t, 3), &Device::Cpu).unwrap()
    }

    fn cat(xs: &[&Tensor]) -> Vec<f32> {
        Tensor::cat(xs, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn flat(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn appends_equal_concatenation_through_growth_and_copies_write_apart() {
        // 60 positions, then 1 at a time past the first buffers' 64 (they grow, keeping what
        // they hold), as a prompt's prefill and its decoding steps fill a cache
        let mut slot = None;
        let mut want_k = vec![rand(60, 1)];
        Slot::push(&mut slot, &want_k[0], &rand(60, 2)).unwrap();
        for i in 0..10 {
            let (k, v) = (rand(1, 10 + i), rand(1, 100 + i));
            want_k.push(k.clone());
            let (ck, cv) = Slot::push(&mut slot, &k, &v).unwrap();
            assert_eq!(ck.dims(), &[2, 61 + i as usize, 3]);
            assert_eq!(flat(&ck), cat(&want_k.iter().collect::<Vec<_>>()));
            assert_eq!(flat(&cv.narrow(1, 60 + i as usize, 1).unwrap()), flat(&v));
        }
        assert!(
            slot.as_ref().unwrap().k.dim(1).unwrap() >= 128,
            "the buffers grew"
        );
        // a copy and the original, continued two ways, each read back their own
        let mut copy = slot.clone();
        let (a, b) = (rand(3, 7), rand(2, 8));
        let (ok, _) = Slot::push(&mut slot, &a, &a).unwrap();
        let (ck, _) = Slot::push(&mut copy, &b, &b).unwrap();
        let before: Vec<&Tensor> = want_k.iter().collect();
        assert_eq!(flat(&ok), cat(&[before.as_slice(), &[&a]].concat()));
        assert_eq!(flat(&ck), cat(&[before.as_slice(), &[&b]].concat()));
        // the original again, after its copy wrote: still its own
        let (ok, _) = slot.as_ref().unwrap().cached().unwrap();
        assert_eq!(flat(&ok), cat(&[before.as_slice(), &[&a]].concat()));
        // a cache's prefix, continued another way, leaves the cache as it was
        let mut cache = KvCache::new(1);
        cache.kv[0] = slot.clone();
        let mut short = cache.prefix(61);
        assert_eq!((short.len(), cache.len()), (61, 73));
        let (sk, _) = Slot::push(&mut short.kv[0], &b, &b).unwrap();
        assert_eq!(flat(&sk), cat(&[&before[..2], &[&b]].concat()));
        let (ok, _) = cache.kv[0].as_ref().unwrap().cached().unwrap();
        assert_eq!(flat(&ok), cat(&[before.as_slice(), &[&a]].concat()));
        assert_eq!(cache.bytes(), 2 * 2 * 128 * 3 * 4);
    }
}
