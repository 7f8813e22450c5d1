//! Continuous batching: sequences join a running batch between decoding steps (after their
//! own prefill) and leave it as soon as they finish, each row through its own adapter and KV
//! cache (`Llama::decode_rows` inside `petal_core::with_adapter_rows`). A server feeds it the
//! requests that arrive while others are being decoded.

use crate::generate::{last_logits, Sequence};
use crate::{Generated, SamplingParams};
use candle_core::Tensor;
use petal_core::mixed::rows_ctx;
use petal_core::Error;
use petal_data::Tokenizer;
use petal_models::{KvCache, Llama};

/// A sequence that finished: the caller's key, what it generated, and the most sequences it
/// was decoded together with (itself included).
pub struct Finished<K> {
    pub key: K,
    pub generated: Generated,
    pub batch: usize,
}

struct Slot<K> {
    key: K,
    seq: Sequence,
    adapter: String,
    next: u32,
    most: usize,
}

/// The sequences being decoded together, each under the caller's key `K`.
pub struct Decoder<'a, K> {
    model: &'a Llama,
    tok: &'a Tokenizer,
    live: Vec<Slot<K>>,
}

impl<'a, K> Decoder<'a, K> {
    pub fn new(model: &'a Llama, tok: &'a Tokenizer) -> Self {
        Decoder {
            model,
            tok,
            live: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Takes out of the batch the sequences whose keys `gone` picks (their clients left, say),
    /// returning their keys.
    pub fn remove(&mut self, gone: impl Fn(&K) -> bool) -> Vec<K> {
        let (out, kept) = self.live.drain(..).partition(|s| gone(&s.key));
        self.live = kept;
        out.into_iter().map(|s: Slot<K>| s.key).collect()
    }

    /// Prefills `prompt` through `adapter` (`__base__`: none); the sequence joins the batch,
    /// or comes back at once if it is done already (its first token ends it). `on_text` gets
    /// the key and each piece of new text (streaming). On an error the key comes back with it.
    #[allow(clippy::type_complexity)]
    pub fn add(
        &mut self,
        mut key: K,
        prompt: &[u32],
        params: SamplingParams,
        adapter: &str,
        on_text: &mut dyn FnMut(&mut K, &str),
    ) -> Result<Option<Finished<K>>, (K, Error)> {
        let first = (|| {
            let mut seq = Sequence::new(self.model, prompt, params)?;
            let ids = Tensor::new(prompt, self.model.device())?.unsqueeze(0)?;
            let ctx = rows_ctx(self.model, &[adapter])?;
            let logits = self.model.forward(&ids, Some(&mut seq.cache), &ctx)?;
            let ctx = self.model.cfg.max_position_embeddings;
            let next = seq.next(last_logits(&logits, 0)?, self.tok, ctx, &mut |t| {
                on_text(&mut key, t)
            })?;
            Ok::<_, Error>((seq, next))
        })();
        match first {
            Err(e) => Err((key, e)),
            Ok((seq, None)) => Ok(Some(Finished {
                key,
                generated: seq.done(),
                batch: 1,
            })),
            Ok((seq, Some(next))) => {
                self.live.push(Slot {
                    key,
                    seq,
                    adapter: adapter.to_string(),
                    next,
                    most: 1,
                });
                Ok(None)
            }
        }
    }

    /// One token for every sequence in the batch; those that finish leave it and come back.
    /// `on_text` as for `add`. On an error every sequence leaves, their keys coming back.
    #[allow(clippy::type_complexity)]
    pub fn step(
        &mut self,
        on_text: &mut dyn FnMut(&mut K, &str),
    ) -> Result<Vec<Finished<K>>, (Vec<K>, Error)> {
        match self.try_step(on_text) {
            Ok(done) => Ok(done),
            Err(e) => Err((self.live.drain(..).map(|s| s.key).collect(), e)),
        }
    }

    fn try_step(
        &mut self,
        on_text: &mut dyn FnMut(&mut K, &str),
    ) -> Result<Vec<Finished<K>>, Error> {
        let b = self.live.len();
        if b == 0 {
            return Ok(Vec::new());
        }
        let ids: Vec<u32> = self.live.iter().map(|s| s.next).collect();
        let ids = Tensor::new(ids.as_slice(), self.model.device())?.unsqueeze(1)?; // (b, 1)
        let rows: Vec<String> = self.live.iter().map(|s| s.adapter.clone()).collect();
        let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
        let mut caches: Vec<&mut KvCache> =
            self.live.iter_mut().map(|s| &mut s.seq.cache).collect();
        let model = self.model;
        let logits = model.decode_rows(&ids, &mut caches, &rows_ctx(model, &rows)?)?;
        let ctx = model.cfg.max_position_embeddings;
        let mut next = Vec::with_capacity(b);
        for (r, s) in self.live.iter_mut().enumerate() {
            s.most = s.most.max(b);
            let key = &mut s.key;
            let logits = last_logits(&logits, r)?;
            next.push(
                s.seq
                    .next(logits, self.tok, ctx, &mut |t| on_text(key, t))?,
            );
        }
        let mut done = Vec::new();
        let mut kept = Vec::with_capacity(b);
        for (s, n) in self.live.drain(..).zip(next) {
            match n {
                Some(n) => kept.push(Slot { next: n, ..s }),
                None => done.push(Finished {
                    key: s.key,
                    generated: s.seq.done(),
                    batch: s.most,
                }),
            }
        }
        self.live = kept;
        Ok(done)
    }
}
