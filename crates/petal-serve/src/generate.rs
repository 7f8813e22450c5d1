//! Autoregressive generation: one prefill over the prompt, then one cached step per token; for
//! several prompts at once, the steps of all unfinished ones as one batch (`generate_batch`,
//! `generate_continuous`).

use crate::logprobs::{self, TokenLogprob};
use crate::sampling::{apply_repetition_penalty, sample, SamplingParams};
use candle_core::{DType, IndexOp, Tensor};
use petal_core::{Ctx, Error, Result};
use petal_data::Tokenizer;
use petal_models::{KvCache, Llama};
use rand::SeedableRng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    /// With `SamplingParams::logprobs`: each sampled token's (an end-of-sequence token
    /// included, which `ids` and `text` leave out)
    pub logprobs: Vec<TokenLogprob>,
    /// With `SamplingParams::prompt_logprobs`: the prompt's tokens' from its second on
    pub prompt_logprobs: Vec<TokenLogprob>,
}

/// Logits of the last position of row `r` of (b, t, vocab) logits.
pub(crate) fn last_logits(logits: &Tensor, r: usize) -> Result<Vec<f32>> {
    let t = logits.dim(1)?;
    Ok(logits.i((r, t - 1))?.to_dtype(DType::F32)?.to_vec1()?)
}

/// One sequence being generated: its sampler, what it has produced, and whether it is done.
#[derive(Clone)]
pub(crate) struct Sequence {
    p: SamplingParams,
    rng: rand::rngs::StdRng,
    seen: Vec<u32>,
    out: Vec<u32>,
    /// The text decoded so far (cut before a stop string once one appears)
    text: String,
    /// How many bytes of `text` went to `on_text`: the last few wait while they could still
    /// begin a stop string, so a stop string never reaches the stream
    sent: usize,
    stop: Option<StopReason>,
    pub(crate) cache: KvCache,
    prompt_len: usize,
    lps: Vec<TokenLogprob>,
    /// how many of `lps` went to `on_text`
    lps_sent: usize,
    prompt_lps: Vec<TokenLogprob>,
}

impl Sequence {
    pub(crate) fn new(model: &Llama, prompt: &[u32], p: SamplingParams) -> Result<Self> {
        if prompt.is_empty() {
            return Err(Error::msg("empty prompt"));
        }
        // a prompt read in parts rotates as one pass over it would (LongRoPE's tables)
        let mut cache = model.new_cache();
        cache.set_rope_span(prompt.len());
        Ok(Sequence {
            rng: rand::rngs::StdRng::seed_from_u64(p.seed),
            p,
            seen: prompt.to_vec(),
            out: Vec::new(),
            text: String::new(),
            sent: 0,
            stop: None,
            cache,
            prompt_len: prompt.len(),
            lps: Vec::new(),
            lps_sent: 0,
            prompt_lps: Vec::new(),
        })
    }

    /// A copy that goes on from here with its own sampling settings (another choice of the
    /// same prompt, before either has drawn a token): the cache copied when first written.
    pub(crate) fn fork(&self, p: SamplingParams) -> Sequence {
        let mut s = self.clone();
        s.set_params(p);
        s
    }

    /// New sampling settings, before a token is drawn.
    pub(crate) fn set_params(&mut self, p: SamplingParams) {
        self.rng = rand::rngs::StdRng::seed_from_u64(p.seed);
        self.p = p;
    }

    /// The tokens whose positions its cache holds (after an input-side adapter's
    /// `virtual_positions`): the prompt and the tokens generated, but the last drawn.
    pub(crate) fn cached_ids(&self, virtual_positions: usize) -> &[u32] {
        let n = self.cache.len().saturating_sub(virtual_positions);
        &self.seen[..n.min(self.seen.len())]
    }

    /// Whether the prompt's log-probabilities are asked for (the prefill then needs the
    /// logits of every position, not only the last).
    pub(crate) fn wants_prompt_logits(&self) -> bool {
        self.p.prompt_logprobs
    }

    /// Records the prompt's log-probabilities from `logits` (t, vocab) of prompt positions
    /// `from..from + t` (each predicting the token after it).
    pub(crate) fn prompt_logits(&mut self, from: usize, logits: &Tensor) -> Result<()> {
        let top = self.p.logprobs.unwrap_or(0);
        let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        for (j, row) in rows.iter().enumerate() {
            if let Some(&id) = self.seen[..self.prompt_len].get(from + j + 1) {
                self.prompt_lps.push(logprobs::of(row, id, top));
            }
        }
        Ok(())
    }

    /// Takes the logits after the last token: the next token to feed, or None once done
    /// (`stop` then says why). `on_text` receives each newly decoded piece, with the
    /// log-probabilities recorded since the last (see `emit`).
    pub(crate) fn next(
        &mut self,
        mut logits: Vec<f32>,
        tok: &Tokenizer,
        ctx: usize,
        on_text: &mut dyn FnMut(&str, &[TokenLogprob]),
    ) -> Result<Option<u32>> {
        let stop = self.advance(&mut logits, tok, ctx)?;
        if let Err(why) = stop {
            if why != StopReason::StopString {
                self.text = decode(tok, &self.out)?;
            }
            self.stop = Some(why);
            self.emit(self.text.len(), true, on_text);
            return Ok(None);
        }
        // hold back what could still be the start of a stop string
        let hold = self
            .p
            .stop
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut upto = self.text.len().saturating_sub(hold);
        while !self.text.is_char_boundary(upto) {
            upto -= 1;
        }
        self.emit(upto, false, on_text);
        Ok(stop.ok())
    }

    /// Sends `text[sent..upto]` to `on_text` with the log-probabilities not sent yet (those of
    /// tokens whose text is held back go with the next piece); at the `end`, whatever is left.
    fn emit(&mut self, upto: usize, end: bool, on_text: &mut dyn FnMut(&str, &[TokenLogprob])) {
        let text = upto > self.sent && self.text.is_char_boundary(self.sent);
        if text || (end && self.lps_sent < self.lps.len()) {
            let piece = if text {
                &self.text[self.sent..upto]
            } else {
                ""
            };
            on_text(piece, &self.lps[self.lps_sent..]);
            self.sent = self.sent.max(upto);
            self.lps_sent = self.lps.len();
        }
    }

    fn advance(
        &mut self,
        logits: &mut [f32],
        tok: &Tokenizer,
        ctx: usize,
    ) -> Result<std::result::Result<u32, StopReason>> {
        if self.out.len() >= self.p.max_new_tokens {
            return Ok(Err(StopReason::MaxTokens));
        }
        if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
            return Err(Error::msg(format!(
                "the model gave a non-finite logit ({} for token {i}) after {} generated \
                 tokens: its weights or an adapter hold NaN or infinite values",
                logits[i],
                self.out.len()
            )));
        }
        // log-probabilities under the model, before the sampling settings act
        let raw = self.p.logprobs.map(|top| (logits.to_vec(), top));
        apply_repetition_penalty(logits, &self.seen, self.p.repetition_penalty);
        let next = sample(logits, &self.p, &mut self.rng);
        if let Some((raw, top)) = raw {
            self.lps.push(logprobs::of(&raw, next, top));
        }
        if Some(next) == tok.eos_id {
            return Ok(Err(StopReason::Eos));
        }
        self.out.push(next);
        self.seen.push(next);
        let full = decode(tok, &self.out)?;
        // Only complete characters (a byte-level token can end mid-character).
        if full.len() > self.text.len() && !full.ends_with('\u{FFFD}') {
            self.text = full;
        }
        let text = &self.text;
        if let Some(pos) = self
            .p
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            self.text.truncate(pos);
            return Ok(Err(StopReason::StopString));
        }
        if self.cache.len() + 1 > ctx {
            return Ok(Err(StopReason::ContextFull));
        }
        // the last token asked for: done now, not after another step whose logits go unused
        if self.out.len() >= self.p.max_new_tokens {
            return Ok(Err(StopReason::MaxTokens));
        }
        Ok(Ok(next))
    }

    pub(crate) fn done(self) -> Generated {
        Generated {
            ids: self.out,
            text: self.text,
            stop: self.stop.unwrap_or(StopReason::MaxTokens),
            logprobs: self.lps,
            prompt_logprobs: self.prompt_lps,
        }
    }
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, true).map_err(|e| Error::msg(e.to_string()))
}

/// Generate from `prompt` token ids; `on_text` receives each newly decoded piece (streaming).
pub fn generate(
    model: &Llama,
    tok: &Tokenizer,
    prompt: &[u32],
    p: &SamplingParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generated> {
    let mut s = Sequence::new(model, prompt, p.clone())?;
    let dev = model.device();
    let ids = Tensor::new(prompt, dev)?.unsqueeze(0)?;
    let mut logits = last_logits(&model.forward(&ids, Some(&mut s.cache), &Ctx::eval())?, 0)?;
    let ctx = model.cfg.max_position_embeddings;
    let on_text = &mut |t: &str, _: &[TokenLogprob]| on_text(t);
    while let Some(next) = s.next(logits, tok, ctx, on_text)? {
        let step = Tensor::new(&[next], dev)?.unsqueeze(0)?;
        logits = last_logits(&model.forward(&step, Some(&mut s.cache), &Ctx::eval())?, 0)?;
    }
    Ok(s.done())
}

/// One prompt of a batch: its token ids, sampling settings and adapter (`BASE`: none).
pub struct Request<'a> {
    pub prompt: &'a [u32],
    pub params: &'a SamplingParams,
    pub adapter: &'a str,
}

/// Generates for every request together (`generate_continuous` with room for all of them):
/// each prompt prefilled on its own (through its adapter), then one batched step per token over
/// the unfinished sequences, each row through its own adapter and KV cache
/// (`Llama::decode_rows`). Each result equals what `generate` gives for that request alone
/// with its adapter active (up to rounding of the batched products).
pub fn generate_batch(model: &Llama, tok: &Tokenizer, reqs: &[Request]) -> Result<Vec<Generated>> {
    let mut out: Vec<Option<Generated>> = vec![None; reqs.len()];
    generate_continuous(model, tok, reqs, reqs.len(), &mut |i, g| out[i] = Some(g))?;
    out.into_iter()
        .map(|g| g.ok_or_else(|| Error::msg("generate_batch: a sequence went missing")))
        .collect()
}

/// Continuous batching over `reqs`: at most `at_once` sequences decode together, and a
/// finished one's place goes to the next request at once, so a long answer holds up no other.
/// `done` receives each result with its index in `reqs` as it finishes (not in order).
pub fn generate_continuous(
    model: &Llama,
    tok: &Tokenizer,
    reqs: &[Request],
    at_once: usize,
    done: &mut dyn FnMut(usize, Generated),
) -> Result<()> {
    let mut dec = crate::batch::Decoder::new(tok);
    let mut next = reqs.iter().enumerate();
    loop {
        while dec.len() < at_once.max(1) {
            let Some((i, r)) = next.next() else { break };
            let added = dec.add(
                model,
                i,
                r.prompt,
                r.params.clone(),
                r.adapter,
                &mut |_, _, _| {},
            );
            if let Some(f) = added.map_err(|(_, e)| e)? {
                done(f.key, f.generated);
            }
        }
        if dec.is_empty() {
            return Ok(());
        }
        for f in dec.step(model, &mut |_, _, _| {}).map_err(|(_, e)| e)? {
            done(f.key, f.generated);
        }
    }
}
