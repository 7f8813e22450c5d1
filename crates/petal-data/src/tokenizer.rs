//! A Hugging Face tokenizer plus what the model needs around it: BOS/EOS, whether BOS is added,
//! and the chat template. Built from `tokenizer.json` + `tokenizer_config.json`, or from GGUF
//! metadata (gpt2-style byte-level BPE).

use crate::{ChatTemplate, DataError, Result};
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::SplitDelimiterBehavior;

/// The split pattern of Qwen2's tokenizer.json (llama.cpp's `qwen2` pre-tokenizer).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
use tokenizers::{AddedToken, PreTokenizerWrapper};

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<ChatTemplate>,
}

fn terr(e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer(e.to_string())
}

/// Parts of a byte-level BPE tokenizer as GGUF stores them.
pub struct BpeParts {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub token_types: Vec<i32>, // 3 = control (special)
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_bos: bool,
    pub pre: String, // llama.cpp pre-tokenizer name ("smollm", "gpt2", …)
    pub chat_template: Option<String>,
}

impl Tokenizer {
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(DataError::Msg(format!("{}: file not found", tj.display())));
        }
        let mut inner = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| terr(format!("{}: {e}", tj.display())))?;
        // petal pads and truncates batches itself (all-MiniLM-L6-v2's file pads to 128)
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| terr(format!("{}: {e}", tj.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| {
                DataError::Msg(format!("{}: not valid JSON: {e}", cfg_path.display()))
            })?,
            Err(_) => serde_json::Value::Null,
        };
        let tok_str = |k: &str| -> Option<String> {
            match cfg.get(k)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
                _ => None,
            }
        };
        let bos = tok_str("bos_token");
        let eos = tok_str("eos_token");
        let bos_id = bos.as_deref().and_then(|t| inner.token_to_id(t));
        let eos_id = eos.as_deref().and_then(|t| inner.token_to_id(t));
        let mut template = cfg.get("chat_template").and_then(|v| v.as_str()).map(|t| {
            let file = dir.join("tokenizer_config.json");
            (
                t.to_string(),
                format!("{}: field `chat_template`", file.display()),
            )
        });
        let jinja = dir.join("chat_template.jinja");
        if template.is_none() && jinja.exists() {
            let at = jinja.display().to_string();
            template = std::fs::read_to_string(&jinja).ok().map(|t| (t, at));
        }
        let chat_template = template
            .map(|(t, at)| {
                ChatTemplate::new(&t, bos.unwrap_or_default(), eos.unwrap_or_default())
                    .map_err(|e| DataError::Msg(format!("{at}: {e}")))
            })
            .transpose()?;
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(Tokenizer {
            inner,
            bos_id,
            eos_id,
            add_bos,
            chat_template,
        })
    }

    pub fn from_bpe_parts(p: BpeParts) -> Result<Self> {
        let vocab: tokenizers::models::bpe::Vocab = p
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = p
            .merges
            .iter()
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(terr)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre: PreTokenizerWrapper = match p.pre.as_str() {
            // SmolLM's tokenizer.json: Digits(individual) then ByteLevel.
            "smollm" | "starcoder" | "refact" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.clone().into()]).into()
            }
            "gpt2" | "default" | "" => byte_level.clone().into(),
            // Qwen2's tokenizer.json: its split regex (digits one by one), then byte-level
            // bytes without a regex of their own
            "qwen2" => Sequence::new(vec![
                Split::new(
                    SplitPattern::Regex(QWEN2_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(terr)?
                .into(),
                ByteLevel::new(false, false, false).into(),
            ])
            .into(),
            other => {
                return Err(terr(format!(
                    "GGUF pre-tokenizer `{other}` is not supported"
                )))
            }
        };
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevel::default()));
        let specials: Vec<AddedToken> = p
            .token_types
            .iter()
            .enumerate()
            .filter(|(_, &ty)| ty == 3)
            .map(|(i, _)| AddedToken::from(p.tokens[i].clone(), true))
            .collect();
        inner.add_special_tokens(&specials);
        let name = |id: Option<u32>| {
            id.and_then(|i| p.tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        let chat_template = p
            .chat_template
            .map(|t| ChatTemplate::new(&t, name(p.bos_id), name(p.eos_id)))
            .transpose()?;
        Ok(Tokenizer {
            inner,
            bos_id: p.bos_id,
            eos_id: p.eos_id,
            add_bos: p.add_bos,
            chat_template,
        })
    }

    /// The tokenizer as GGUF stores a byte-level BPE one (the inverse of `from_bpe_parts`):
    /// tokens by id (added tokens included: special ones control, type 3, the others
    /// user-defined, 4), merges as "a b", and llama.cpp's name of its pre-tokenizer (`gpt2`,
    /// `smollm`, `qwen2`). Other models and pre-tokenizers: an error naming them.
    pub fn to_bpe_parts(&self) -> Result<BpeParts> {
        let text = self.inner.to_string(false).map_err(terr)?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| DataError::Msg(e.to_string()))?;
        let model = &json["model"];
        let ty = model["type"].as_str().unwrap_or("?");
        if ty != "BPE" {
            return Err(terr(format!(
                "a {ty} tokenizer has no GGUF form here (byte-level BPE has)"
            )));
        }
        let mut tokens: Vec<Option<String>> = Vec::new();
        let mut token_types: Vec<i32> = Vec::new();
        let mut put = |id: u64, tok: &str, kind: i32| {
            let i = id as usize;
            if tokens.len() <= i {
                tokens.resize(i + 1, None);
                token_types.resize(i + 1, 1);
            }
            tokens[i] = Some(tok.to_string());
            token_types[i] = kind;
        };
        for (tok, id) in model["vocab"].as_object().into_iter().flatten() {
            put(id.as_u64().unwrap_or(0), tok, 1);
        }
        for a in json["added_tokens"].as_array().into_iter().flatten() {
            let special = a["special"].as_bool().unwrap_or(false);
            let (id, tok) = (
                a["id"].as_u64().unwrap_or(0),
                a["content"].as_str().unwrap_or(""),
            );
            put(id, tok, if special { 3 } else { 4 });
        }
        let tokens = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
            .collect();
        let merges = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match m {
                serde_json::Value::Array(p) => {
                    let s: Vec<&str> = p.iter().filter_map(|x| x.as_str()).collect();
                    s.join(" ")
                }
                other => other.as_str().unwrap_or("").to_string(),
            })
            .collect();
        Ok(BpeParts {
            tokens,
            merges,
            token_types,
            bos_id: self.bos_id,
            eos_id: self.eos_id,
            add_bos: self.add_bos,
            pre: pre_name(&json["pre_tokenizer"])?,
            chat_template: self.chat_template.as_ref().map(|t| t.source.clone()),
        })
    }

    /// Token ids of `text`; BOS first when the model adds one and `add_special` is set.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(terr)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Ids and token types of a text, or a text pair, framed by the tokenizer's own special
    /// tokens (BERT's `[CLS] a [SEP] b [SEP]`, type 1 on b and its `[SEP]`), no padding, at
    /// most `max_len` tokens: the longer text is cut first, the special tokens kept (the
    /// `longest_first` truncation of transformers). A `max_len` with no room for text beside
    /// the special tokens is refused.
    pub fn encode_classification(
        &self,
        text: &str,
        pair: Option<&str>,
        max_len: usize,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        use tokenizers::utils::truncation::{truncate_encodings, TruncationParams};
        use tokenizers::PostProcessor;
        let a = self.inner.encode(text, false).map_err(terr)?;
        let b = pair
            .map(|p| self.inner.encode(p, false))
            .transpose()
            .map_err(terr)?;
        let specials = self
            .inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(b.is_some()));
        if max_len <= specials {
            return Err(DataError::Msg(format!(
                "sequence length {max_len} (--seq-len) leaves no room for text beside the \
                 {specials} special tokens: give at least {}",
                specials + 1
            )));
        }
        // transformers' "longest_first", by the tokenizers crate's own truncation: the longer
        // text keeps max(shorter, room - shorter) tokens; when both must be cut each keeps
        // half the room, the odd token to the text that was longer (to the second on a tie)
        let params = TruncationParams {
            max_length: max_len - specials,
            ..Default::default()
        };
        let (a, b) = truncate_encodings(a, b, &params).map_err(terr)?;
        let enc = self.inner.post_process(a, b, true).map_err(terr)?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    /// The special tokens (added tokens marked special, BOS and EOS) that occur in
    /// `examples`, the unknown token excepted, ascending.
    pub fn special_ids_in(&self, examples: &[crate::Example]) -> Vec<u32> {
        let unk = ["[UNK]", "<unk>"].map(|t| self.inner.token_to_id(t));
        let mut special: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(id, t)| t.special && !unk.contains(&Some(**id)))
            .map(|(id, _)| *id)
            .chain(self.bos_id)
            .chain(self.eos_id)
            .collect();
        special.sort_unstable();
        special.dedup();
        let mut seen = vec![false; special.len()];
        for e in examples {
            for id in &e.ids {
                if let Ok(i) = special.binary_search(id) {
                    seen[i] = true;
                }
            }
        }
        special
            .into_iter()
            .zip(seen)
            .filter_map(|(id, s)| s.then_some(id))
            .collect()
    }

    /// Ids with each token's byte offsets into `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let enc = self.inner.encode(text, false).map_err(terr)?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(terr)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Write tokenizer.json and tokenizer_config.json (for exported model folders).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = self.inner.to_string(false).map_err(terr)?;
        write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        let name = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let cfg = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id),
            "eos_token": name(self.eos_id),
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template.as_ref().map(|t| t.source.clone()),
            "model_max_length": 8192,
        });
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| DataError::Msg(e.to_string()))?;
        write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())
    }
}

/// Temp file in the same folder, then rename: readers never see a half-written file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// llama.cpp's name of the pre-tokenizers `from_bpe_parts` builds, read from tokenizer.json.
fn pre_name(pre: &serde_json::Value) -> Result<String> {
    let ty = |v: &serde_json::Value| v["type"].as_str().unwrap_or("").to_string();
    let parts: Vec<&serde_json::Value> = match ty(pre).as_str() {
        "Sequence" => pre["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect(),
        _ => vec![pre],
    };
    let kinds: Vec<String> = parts.iter().map(|p| ty(p)).collect();
    let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
    match kinds[..] {
        ["ByteLevel"] => Ok("gpt2".into()),
        ["Digits", "ByteLevel"] if parts[0]["individual_digits"] == true => Ok("smollm".into()),
        ["Split", "ByteLevel"] if parts[0]["pattern"]["Regex"] == QWEN2_SPLIT => Ok("qwen2".into()),
        _ => Err(terr(format!(
            "pre-tokenizer {kinds:?} has no llama.cpp name petal knows (gpt2, smollm, qwen2)"
        ))),
    }
}
