//! Continuous batching: sequences join a running batch between decoding steps (after their
//! own prefill) and leave it as soon as they finish, each row through its own adapter and KV
//! cache (`Llama::decode_rows` under `petal_core::rows_ctx`; or, all rows
//! `petal_core::mixed::ACTIVE`, each through the model as it is). A server feeds it the
//! requests that arrive while others are being decoded. A prompt longer than the prefill
//! chunk is read a chunk per step (`Decoder::with_prefill_chunk`), so that it delays the
//! running batch by one chunk's forward a step, not by its whole prefill. With a prefix cache
//! (`Decoder::with_prefix_cache`), a prompt that begins as an earlier finished sequence did
//! (through the same adapter) goes on from that sequence's cache.

use crate::generate::{last_logits, Sequence};
use crate::logprobs::TokenLogprob;
use crate::prefix::PrefixCache;
use crate::{Generated, SamplingParams};
use candle_core::Tensor;
use petal_core::mixed::batch_ctx;
use petal_core::Error;
use petal_data::Tokenizer;
use petal_models::{KvCache, Llama};

/// A sequence that finished: the caller's key, what it generated, and the most sequences it
/// was decoded together with (itself included).
pub struct Finished<K> {
    pub key: K,
    pub generated: Generated,
    pub batch: usize,
    /// when its first token was drawn (its prompt read)
    pub first_token_at: std::time::Instant,
    /// its prompt's tokens taken from the prefix cache (not read again)
    pub cached: usize,
}

struct Slot<K> {
    key: K,
    seq: Sequence,
    adapter: String,
    next: u32,
    most: usize,
    first_token_at: std::time::Instant,
    cached: usize,
}

/// A sequence whose prompt is still being read, a chunk a step.
struct Reading<K> {
    key: K,
    seq: Sequence,
    adapter: String,
    prompt: Vec<u32>,
    /// prompt tokens already in the cache
    read: usize,
    /// of those, taken from the prefix cache
    cached: usize,
    /// sequences that continue from a copy of this one's cache once its prompt is read
    forks: Vec<(K, SamplingParams)>,
}

/// Prompt tokens prefilled in one piece by default; longer prompts are read this many a step.
pub const PREFILL_CHUNK: usize = 256;

/// The sequences being decoded together, each under the caller's key `K`.
/// The model is passed to each call (not held), so that a server may attach and detach
/// adapters between steps.
pub struct Decoder<'a, K> {
    tok: &'a Tokenizer,
    live: Vec<Slot<K>>,
    reading: std::collections::VecDeque<Reading<K>>,
    chunk: usize,
    /// prompt tokens run through the model so far
    prefilled: usize,
    /// finished sequences' caches, for prompts that begin as they did (None: not kept)
    prefixes: Option<PrefixCache>,
    /// prompt tokens taken from the prefix cache so far
    reused: usize,
    /// sequences that finished in a step that failed for others: the next step returns them
    ready: Vec<Finished<K>>,
}

impl<'a, K> Decoder<'a, K> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        Decoder {
            tok,
            live: Vec::new(),
            reading: Default::default(),
            chunk: PREFILL_CHUNK,
            prefilled: 0,
            prefixes: None,
            reused: 0,
            ready: Vec::new(),
        }
    }

    /// Keeps finished sequences' KV caches, up to `bytes` of them (the least recently used
    /// dropped first; 0: none), so that a prompt through the same adapter that begins with the
    /// same tokens (a shared system prompt, a conversation's earlier turns) reads only the rest.
    /// Not for prompts whose log-probabilities are asked for, nor under LongRoPE (whose
    /// rotation depends on the whole prompt's length).
    pub fn with_prefix_cache(mut self, bytes: usize) -> Self {
        self.prefixes = (bytes > 0).then(|| PrefixCache::new(bytes));
        self
    }

    /// Drops the prefix cache's entries through `adapter` (detached: another may take its name).
    pub fn forget(&mut self, adapter: &str) {
        if let Some(p) = &mut self.prefixes {
            p.forget(adapter);
        }
    }

    /// Prompt tokens taken from the prefix cache so far, not run through the model.
    pub fn reused(&self) -> usize {
        self.reused
    }

    /// Prompts longer than `n` tokens are read `n` a step (at least 1).
    pub fn with_prefill_chunk(mut self, n: usize) -> Self {
        self.chunk = n.max(1);
        self
    }

    /// The sequences in the batch, those whose prompts are still being read (and those
    /// finished but not yet returned) included.
    pub fn len(&self) -> usize {
        self.live.len() + self.waiting() + self.ready.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Prompt tokens run through the model so far (a prompt shared by forks counts once).
    pub fn prefilled(&self) -> usize {
        self.prefilled
    }

    /// The sequences whose prompts are still (wholly or partly) to be read.
    pub fn waiting(&self) -> usize {
        self.reading.iter().map(|r| 1 + r.forks.len()).sum()
    }

    /// Whether a sequence in the batch (its prompt read or not) goes through `adapter`.
    pub fn uses(&self, adapter: &str) -> bool {
        self.live.iter().any(|s| s.adapter == adapter)
            || self.reading.iter().any(|r| r.adapter == adapter)
    }

    /// Takes out of the batch the sequences whose keys `gone` picks (their clients left, say),
    /// returning their keys.
    pub fn remove(&mut self, gone: impl Fn(&K) -> bool) -> Vec<K> {
        let (out, kept) = self.live.drain(..).partition(|s| gone(&s.key));
        self.live = kept;
        let mut keys: Vec<K> = out.into_iter().map(|s: Slot<K>| s.key).collect();
        for mut r in std::mem::take(&mut self.reading) {
            let (left, forks): (Vec<_>, Vec<_>) = r.forks.into_iter().partition(|(k, _)| gone(k));
            keys.extend(left.into_iter().map(|(k, _)| k));
            r.forks = forks;
            if !gone(&r.key) {
                self.reading.push_back(r);
            } else if !r.forks.is_empty() {
                // the first fork left takes the place of the sequence that went (nothing has
                // been drawn yet: only the sampler changes)
                let (k, p) = r.forks.remove(0);
                keys.push(std::mem::replace(&mut r.key, k));
                r.seq.set_params(p);
                self.reading.push_back(r);
            } else {
                keys.push(r.key);
            }
        }
        keys
    }

    /// Adds `prompt` through `adapter` (`__base__`: none). Into an empty batch a prompt of at
    /// most the prefill chunk is read at once: the sequence joins the batch, or comes back at
    /// once if it is done already (its first token ends it). Otherwise it waits to be read,
    /// within the steps' budget of prefill tokens (see `step`). `on_text` gets the key and
    /// each piece of new text (streaming) with its log-probabilities. On an error the key
    /// comes back with it.
    #[allow(clippy::type_complexity)]
    pub fn add(
        &mut self,
        model: &Llama,
        key: K,
        prompt: &[u32],
        params: SamplingParams,
        adapter: &str,
        on_text: &mut dyn FnMut(&mut K, &str, &[TokenLogprob]),
    ) -> Result<Option<Finished<K>>, (K, Error)> {
        match self.add_forked(model, (key, params), Vec::new(), prompt, adapter, on_text) {
            Ok(mut done) => Ok(done.pop()),
            Err((mut keys, e)) => Err((keys.pop().expect("the key of the failed sequence"), e)),
        }
    }

    /// `add` for several sequences of one prompt (a request's `n` choices): the prompt is
    /// read once, for the first, and each of `forks` (its key and sampling settings) goes on
    /// from a copy of that cache, drawing its first token from the same logits. Those done at
    /// their first token come back; on an error, the keys of those that failed.
    #[allow(clippy::type_complexity)]
    pub fn add_forked(
        &mut self,
        model: &Llama,
        (key, params): (K, SamplingParams),
        forks: Vec<(K, SamplingParams)>,
        prompt: &[u32],
        adapter: &str,
        on_text: &mut dyn FnMut(&mut K, &str, &[TokenLogprob]),
    ) -> Result<Vec<Finished<K>>, (Vec<K>, Error)> {
        let mut seq = match Sequence::new(model, prompt, params) {
            Ok(seq) => seq,
            Err(e) => return Err((keys_of(key, forks), e)),
        };
        let mut read = 0;
        let fit = !seq.wants_prompt_logits() && prefixes_fit(model);
        if let Some(p) = self.prefixes.as_mut().filter(|_| fit) {
            if let Some((cache, n)) = p.find(adapter, prompt, model.virtual_positions()) {
                seq.cache = cache;
                seq.cache.set_rope_span(prompt.len());
                read = n;
            }
        }
        self.reused += read;
        if prompt.len() - read > self.chunk || !self.is_empty() {
            self.reading.push_back(Reading {
                key,
                seq,
                adapter: adapter.to_string(),
                prompt: prompt.to_vec(),
                read,
                cached: read,
                forks,
            });
            return Ok(Vec::new());
        }
        let part = &prompt[read..];
        self.read_last(model, (key, seq), forks, part, adapter, read, on_text)
    }

    /// The last `part` of a prompt read into `seq`'s cache, `forks` copied from it, and each
    /// sequence's first token drawn: those done already come back, the others join the batch.
    /// `cached`: the prompt's tokens taken from the prefix cache.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn read_last(
        &mut self,
        model: &Llama,
        (key, mut seq): (K, Sequence),
        forks: Vec<(K, SamplingParams)>,
        part: &[u32],
        adapter: &str,
        cached: usize,
        on_text: &mut dyn FnMut(&mut K, &str, &[TokenLogprob]),
    ) -> Result<Vec<Finished<K>>, (Vec<K>, Error)> {
        self.prefilled += part.len();
        let logits =
            Self::prefill(model, &mut seq, part, adapter, true).and_then(|l| last_logits(&l, 0));
        let logits = match logits {
            Ok(l) => l,
            Err(e) => return Err((keys_of(key, forks), e)),
        };
        let copies: Vec<(K, Sequence)> = forks.into_iter().map(|(k, p)| (k, seq.fork(p))).collect();
        let ctx = model.cfg.max_position_embeddings;
        let (mut done, mut failed) = (Vec::new(), None);
        for (mut key, mut seq) in std::iter::once((key, seq)).chain(copies) {
            let first = seq.next(logits.clone(), self.tok, ctx, &mut |t, l| {
                on_text(&mut key, t, l)
            });
            match first {
                Err(e) => failed.get_or_insert((Vec::new(), e)).0.push(key),
                Ok(None) => {
                    keep(&mut self.prefixes, model, adapter, &seq);
                    done.push(Finished {
                        key,
                        generated: seq.done(),
                        batch: 1,
                        first_token_at: std::time::Instant::now(),
                        cached,
                    })
                }
                Ok(Some(next)) => self.live.push(Slot {
                    key,
                    seq,
                    adapter: adapter.to_string(),
                    next,
                    most: 1,
                    first_token_at: std::time::Instant::now(),
                    cached,
                }),
            }
        }
        match failed {
            // those done already fail with them: they are choices of the same request
            Some((mut keys, e)) => {
                keys.extend(done.into_iter().map(|f| f.key));
                Err((keys, e))
            }
            None => Ok(done),
        }
    }

    /// `part` of `seq`'s prompt into its cache through `adapter`: the logits (1, t, vocab) of
    /// its `last` position (none: `last` false), or of every position where the prompt's
    /// log-probabilities are asked for (recorded into `seq`).
    fn prefill(
        model: &Llama,
        seq: &mut Sequence,
        part: &[u32],
        adapter: &str,
        last: bool,
    ) -> Result<Tensor, Error> {
        let ids = Tensor::new(part, model.device())?.unsqueeze(0)?;
        let ctx = batch_ctx(model, &[adapter])?;
        // prompt tokens read before this part (an input-side adapter's positions not counted)
        let from = seq.cache.len().saturating_sub(model.virtual_positions());
        let h = model.hidden_states(&ids, Some(&mut seq.cache), &ctx)?;
        if seq.wants_prompt_logits() {
            // the part's own positions (virtual tokens come first, at the first part)
            let logits = model.head(&h, &ctx)?;
            let own = logits.narrow(1, logits.dim(1)? - part.len(), part.len())?;
            seq.prompt_logits(from, &own.squeeze(0)?)?;
            return Ok(own);
        }
        if !last {
            return Ok(h);
        }
        let t = h.dim(1)?;
        model.head(&h.narrow(1, t - 1, 1)?, &ctx)
    }

    /// One token for every sequence in the batch; those that finish leave it and come back.
    /// `on_text` as for `add`. On an error every sequence leaves, their keys coming back.
    /// First, prompts waiting to be read take up to one prefill chunk of tokens between them
    /// (whole short prompts, or a part of a long one), so that however many arrive at once,
    /// the running batch waits at most one chunk's forward a step (an error there comes back
    /// with that sequence's key alone).
    pub fn step(
        &mut self,
        model: &Llama,
        on_text: &mut dyn FnMut(&mut K, &str, &[TokenLogprob]),
    ) -> Result<Vec<Finished<K>>, (Vec<K>, Error)> {
        let mut read = std::mem::take(&mut self.ready);
        if let Err(e) = self.read_chunk(model, &mut read, on_text) {
            self.ready = read; // they come back from the next step
            return Err(e);
        }
        match self.try_step(model, on_text) {
            Ok(mut done) => {
                done.extend(read);
                Ok(done)
            }
            Err(e) => {
                self.ready = read;
                Err((self.live.drain(..).map(|s| s.key).collect(), e))
            }
        }
    }

    /// Prompts still being read, up to one chunk of tokens between them: first every prompt
    /// whose rest fits in what is left of the chunk (in arrival order), then a part of the
    /// first one that does not (a long prompt, read over several steps, does not hold up the
    /// short ones queued behind it; the batch's size bounds how many can pass it). Each
    /// sequence joins the batch after its prompt's last part, or goes into `done` if its first
    /// token ends it. On an error, the keys of the sequences that failed.
    #[allow(clippy::type_complexity)]
    fn read_chunk(
        &mut self,
        model: &Llama,
        done: &mut Vec<Finished<K>>,
        on_text: &mut dyn FnMut(&mut K, &str, &[TokenLogprob]),
    ) -> Result<(), (Vec<K>, Error)> {
        let mut budget = self.chunk;
        let mut i = 0;
        while budget > 0 && i < self.reading.len() {
            let rest = self.reading[i].prompt.len() - self.reading[i].read;
            if rest > budget {
                i += 1;
                continue;
            }
            budget -= rest;
            let Some(r) = self.reading.remove(i) else {
                break;
            };
            let part = &r.prompt[r.read..];
            let (seq, cached) = ((r.key, r.seq), r.cached);
            done.extend(self.read_last(model, seq, r.forks, part, &r.adapter, cached, on_text)?);
        }
        if budget > 0 {
            if let Some(r) = self.reading.front_mut() {
                // a part of a long prompt: into the cache, no token yet
                let end = r.read + budget; // < its length: it did not fit
                let part = &r.prompt[r.read..end];
                if let Err(e) = Self::prefill(model, &mut r.seq, part, &r.adapter, false) {
                    let r = self.reading.pop_front().expect("the front prompt");
                    return Err((keys_of(r.key, r.forks), e));
                }
                r.read = end;
                self.prefilled += budget;
            }
        }
        Ok(())
    }

    fn try_step(
        &mut self,
        model: &Llama,
        on_text: &mut dyn FnMut(&mut K, &str, &[TokenLogprob]),
    ) -> Result<Vec<Finished<K>>, Error> {
        let b = self.live.len();
        if b == 0 {
            return Ok(Vec::new());
        }
        let ids: Vec<u32> = self.live.iter().map(|s| s.next).collect();
        let ids = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(1)?; // (b, 1)
        let rows: Vec<String> = self.live.iter().map(|s| s.adapter.clone()).collect();
        let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
        let mut caches: Vec<&mut KvCache> =
            self.live.iter_mut().map(|s| &mut s.seq.cache).collect();
        let logits = model.decode_rows(&ids, &mut caches, &batch_ctx(model, &rows)?)?;
        let ctx = model.cfg.max_position_embeddings;
        let mut next = Vec::with_capacity(b);
        for (r, s) in self.live.iter_mut().enumerate() {
            s.most = s.most.max(b);
            let key = &mut s.key;
            let logits = last_logits(&logits, r)?;
            next.push(
                s.seq
                    .next(logits, self.tok, ctx, &mut |t, l| on_text(key, t, l))?,
            );
        }
        let mut done = Vec::new();
        let mut kept = Vec::with_capacity(b);
        for (s, n) in self.live.drain(..).zip(next) {
            match n {
                Some(n) => kept.push(Slot { next: n, ..s }),
                None => {
                    keep(&mut self.prefixes, model, &s.adapter, &s.seq);
                    done.push(Finished {
                        key: s.key,
                        generated: s.seq.done(),
                        batch: s.most,
                        first_token_at: s.first_token_at,
                        cached: s.cached,
                    })
                }
            }
        }
        self.live = kept;
        Ok(done)
    }
}

/// Whether a prompt through `model` may go on from another sequence's cache: not under LongRoPE
/// (whose rotation depends on the whole prompt's length), nor under an input-side adapter that
/// counts from the start of the sequence (PASTA's occurrence slots).
fn prefixes_fit(model: &Llama) -> bool {
    model.rope_switch().is_none() && model.continues_a_cache()
}

/// A finished sequence's cache into the prefix cache (if one is kept and could be reused), with
/// the tokens it holds.
fn keep(prefixes: &mut Option<PrefixCache>, model: &Llama, adapter: &str, seq: &Sequence) {
    if let Some(p) = prefixes.as_mut().filter(|_| prefixes_fit(model)) {
        let tokens = seq.cached_ids(model.virtual_positions());
        p.keep(adapter, tokens, seq.cache.clone());
    }
}

/// A sequence's key and its forks' keys.
fn keys_of<K>(key: K, forks: Vec<(K, SamplingParams)>) -> Vec<K> {
    std::iter::once(key)
        .chain(forks.into_iter().map(|(k, _)| k))
        .collect()
}
