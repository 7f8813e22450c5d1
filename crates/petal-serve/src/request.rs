//! A completion request read into a `Job`: its adapter, its prompts (a string, a list of
//! strings, token ids, or a list of token-id lists, as OpenAI's `/v1/completions` takes them;
//! chat messages rendered with the model's template) and what it asks for (`fields.rs`).

use crate::fields::{asked, Asked};
use crate::server::{bad, Failure, Served};
use petal_core::mixed::{every_row, BASE};
use petal_data::template::Message;
use serde_json::Value;
use std::time::Instant;

/// The most sequences one request may ask for (prompts times `n`).
pub(crate) const MAX_CHOICES: usize = 128;

/// A checked request: its prompts, each generated `n` times through `adapter` (`BASE`: none).
pub(crate) struct Job {
    pub prompts: Vec<Prompt>,
    pub asked: Asked,
    pub adapter: String,
    pub chat: bool,
    /// Server-sent events as the text is generated (`"stream": true`)
    pub stream: bool,
    /// Unix seconds at arrival (the response's `created` and `id`)
    pub created: u64,
    /// arrival at the engine (latency metrics)
    pub arrived: Instant,
}

/// One prompt: its token ids, and its text where `echo` returns it.
pub(crate) struct Prompt {
    pub ids: Vec<u32>,
    pub text: String,
}

impl Job {
    /// The sequences it asks for: prompts times `n`.
    pub fn choices(&self) -> usize {
        self.prompts.len() * self.asked.n
    }
}

impl Served<'_> {
    /// The adapter a request's `model` field names (`BASE` for the base model).
    pub(crate) fn adapter(&self, req: &Value) -> Result<String, Failure> {
        let name = match req.get("model") {
            None | Some(Value::Null) => return Ok(BASE.to_string()),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(bad("`model` must be a string")),
        };
        if let Some(every) = every_row(&*self.model) {
            // served alone: the model's id means the model with it
            if name == self.model_id || name == every {
                return Ok(every);
            }
            if name == BASE {
                return Err(bad(format!(
                    "`model`: `{BASE}` is not served: adapter `{every}` acts on every request \
                     (prompt learning, PASTA or LN tuning); ask for `{every}` or `{}`",
                    self.model_id
                )));
            }
        } else if name == self.model_id || name == BASE {
            return Ok(BASE.to_string());
        }
        let known = self.adapters();
        if known.contains(&name) {
            return Ok(name);
        }
        Err(Failure(
            404,
            "not_found_error",
            format!(
                "model `{name}` is not served (serving: {}{})",
                self.model_id,
                known.iter().map(|a| format!(", {a}")).collect::<String>()
            ),
        ))
    }

    /// A completion request checked and tokenized.
    pub(crate) fn job(&self, req: &Value, chat: bool) -> Result<Job, Failure> {
        let adapter = self.adapter(req)?;
        let asked = asked(req, chat)?;
        let prompts = if chat {
            let ids = self.chat_ids(req)?;
            vec![Prompt {
                ids,
                text: String::new(),
            }]
        } else {
            self.prompts(req, asked.echo)?
        };
        let ctx = self.model.cfg.max_position_embeddings;
        for (i, p) in prompts.iter().enumerate() {
            let which = if prompts.len() > 1 {
                format!("prompt {i}")
            } else {
                "the prompt".into()
            };
            if p.ids.is_empty() {
                return Err(bad(format!("{which} is empty")));
            }
            if p.ids.len() >= ctx {
                return Err(bad(format!(
                    "{which} has {} tokens; the model's context is {ctx}",
                    p.ids.len()
                )));
            }
        }
        let choices = prompts.len() * asked.n;
        if choices > MAX_CHOICES {
            return Err(bad(format!(
                "{} prompts x `n` {} = {choices} completions; at most {MAX_CHOICES} a request",
                prompts.len(),
                asked.n
            )));
        }
        let stream = match req.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("`stream` must be true or false")),
        };
        if asked.params.max_new_tokens > self.max_tokens {
            return Err(bad(format!(
                "`max_tokens` {} is above this server's limit of {} (petal serve --max-tokens)",
                asked.params.max_new_tokens, self.max_tokens
            )));
        }
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Job {
            prompts,
            asked,
            adapter,
            chat,
            stream,
            created,
            arrived: Instant::now(),
        })
    }

    /// `/v1/completions`' `prompt`: a string, a list of strings, a list of token ids, or a
    /// list of such lists (ids as given: no beginning-of-sequence token added).
    fn prompts(&self, req: &Value, echo: bool) -> Result<Vec<Prompt>, Failure> {
        let form = "`prompt` must be a string, a list of strings, a list of token ids or a list \
                    of token-id lists";
        let vocab = self.model.vocab_size();
        let text = |s: &str| -> Result<Prompt, Failure> {
            let ids = self
                .tokenizer
                .encode(s, true)
                .map_err(|e| bad(e.to_string()))?;
            Ok(Prompt {
                ids,
                text: s.to_string(),
            })
        };
        let ids = |i: usize, a: &[Value]| -> Result<Prompt, Failure> {
            let ids = a
                .iter()
                .map(|v| v.as_u64().filter(|&t| t < vocab as u64).map(|t| t as u32))
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| {
                    bad(format!("`prompt` {i}: token ids must be whole numbers below the vocabulary's {vocab}"))
                })?;
            let text = if echo {
                self.tokenizer
                    .decode(&ids, false)
                    .map_err(|e| bad(e.to_string()))?
            } else {
                String::new()
            };
            Ok(Prompt { ids, text })
        };
        match req.get("prompt") {
            None | Some(Value::Null) => Err(bad("`prompt` is required")),
            Some(Value::String(s)) => Ok(vec![text(s)?]),
            Some(Value::Array(a)) if a.is_empty() => Err(bad("`prompt` is an empty list")),
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
                .iter()
                .map(|s| text(s.as_str().unwrap_or_default()))
                .collect(),
            Some(Value::Array(a)) if a.iter().all(Value::is_number) => Ok(vec![ids(0, a)?]),
            Some(Value::Array(a)) if a.iter().all(Value::is_array) => a
                .iter()
                .enumerate()
                .map(|(i, p)| ids(i, p.as_array().map_or(&[][..], |v| v.as_slice())))
                .collect(),
            Some(_) => Err(bad(form)),
        }
    }

    fn chat_ids(&self, req: &Value) -> Result<Vec<u32>, Failure> {
        let msgs = req
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("`messages` (a list of {role, content}) is required"))?;
        if msgs.is_empty() {
            return Err(bad(
                "`messages` is empty: give at least one {role, content}",
            ));
        }
        let msgs = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let field = |k: &str| {
                    m.get(k)
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("messages[{i}].{k} must be a string")))
                };
                let role = field("role")?;
                // training data's roles, and OpenAI's `developer` and Llama 3.1's `ipython`,
                // which chat templates that know them render
                let roles = [petal_data::dataset::ROLES, &["developer", "ipython"]].concat();
                if !roles.contains(&role.as_str()) {
                    let roles = roles.join(", ");
                    return Err(bad(format!(
                        "messages[{i}].role `{role}` is not one of {roles}"
                    )));
                }
                Ok(Message {
                    role,
                    content: field("content")?,
                })
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        let t = self
            .tokenizer
            .chat_template
            .as_ref()
            .ok_or_else(|| bad("this model has no chat template: use /v1/completions"))?;
        let text = t.render(&msgs, true).map_err(|e| bad(e.to_string()))?;
        self.tokenizer
            .encode(&text, true)
            .map_err(|e| bad(e.to_string()))
    }
}
