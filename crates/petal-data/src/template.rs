//! Chat templates: the model's own Jinja template (as in tokenizer_config.json), rendered with
//! minijinja and Python-compatible string methods, as transformers' `apply_chat_template` does.

use crate::{DataError, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: String,
    bos: String,
    eos: String,
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        msg,
    ))
}

impl ChatTemplate {
    pub fn new(source: &str, bos: String, eos: String) -> Result<Self> {
        let t = ChatTemplate {
            source: source.to_string(),
            bos,
            eos,
        };
        t.env()?; // syntax check now, not at the first render
        Ok(t)
    }

    fn env(&self) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template("chat", &self.source)
            .map_err(|e| DataError::Template(e.to_string()))?;
        Ok(env)
    }

    /// Render `messages`; with `add_generation_prompt` the assistant header is appended.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.env()?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| DataError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| DataError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, verbatim from its tokenizer_config.json.
    pub const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, c: &str) -> Message {
        Message {
            role: role.into(),
            content: c.into(),
        }
    }

    #[test]
    fn smollm2_template_renders_exactly_what_transformers_renders() {
        // Reference: transformers' apply_chat_template(tokenize=False) output for this template.
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>".into(), "<|im_end|>".into()).unwrap();
        let out = t
            .render(&[msg("user", "Hi"), msg("assistant", "Hello!")], false)
            .unwrap();
        let want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n";
        assert_eq!(out, want);
        let gen = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")], true)
            .unwrap();
        assert_eq!(gen, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_in_a_template_becomes_an_error() {
        let t = ChatTemplate::new(
            "{{ raise_exception('no system role') }}",
            String::new(),
            String::new(),
        )
        .unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("no system role"), "{e}");
    }
}
