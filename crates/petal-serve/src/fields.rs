//! The sampling fields of a completion request, checked against OpenAI's ranges (and petal's
//! own for its extensions): a value out of range is a 400 naming the field.

use crate::server::{bad, Failure};
use crate::SamplingParams;
use serde_json::Value;

/// What a request asks for besides its prompt: sampling settings, choices a prompt, and the
/// log-probabilities to return.
#[derive(Debug)]
pub(crate) struct Asked {
    pub params: SamplingParams,
    /// Choices a prompt (`n`, >= 1)
    pub n: usize,
    /// Alternatives a token, where log-probabilities are asked for
    pub top: Option<usize>,
    /// The prompt comes back in front of the text (`/v1/completions`' `echo`)
    pub echo: bool,
}

/// A request's fields (`chat`: `/v1/chat/completions`'), with OpenAI's defaults. Without a
/// `seed`, a random one.
pub(crate) fn asked(req: &Value, chat: bool) -> Result<Asked, Failure> {
    let p = sampling(req)?;
    let flag = |k: &str| match req.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(format!("`{k}` must be true or false"))),
    };
    let count = |k: &str| match req.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| *x >= 0.0 && x.fract() == 0.0)
            .map(|x| Some(x as usize))
            .ok_or_else(|| bad(format!("`{k}` must be a whole number >= 0, not {v}"))),
    };
    let max = crate::logprobs::MAX_TOP;
    let top = if chat {
        let top = count("top_logprobs")?;
        match (flag("logprobs")?, top) {
            (false, Some(_)) => return Err(bad("`top_logprobs` needs `logprobs`: true")),
            (false, None) => None,
            (true, t) => Some(t.unwrap_or(0)),
        }
    } else {
        count("logprobs")?
    };
    if let Some(t) = top.filter(|&t| t > max) {
        let k = if chat { "top_logprobs" } else { "logprobs" };
        return Err(bad(format!("`{k}` must be in 0..={max}, not {t}")));
    }
    let echo = !chat && flag("echo")?;
    if echo && flag("stream")? {
        return Err(bad(
            "`echo` with `stream` is not supported: ask for one or the other",
        ));
    }
    let n = count("n")?.unwrap_or(1);
    if n == 0 {
        return Err(bad("`n` must be >= 1, not 0"));
    }
    // chat's `max_completion_tokens` (OpenAI's name now) or `max_tokens` (its older one)
    let completion = if chat {
        count("max_completion_tokens")?
    } else {
        None
    };
    if completion.is_some() && req.get("max_tokens").is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "give `max_completion_tokens` or `max_tokens`, not both",
        ));
    }
    let key = if completion.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_new_tokens = match completion.map_or_else(|| count("max_tokens"), |c| Ok(Some(c)))? {
        // an echoed prompt alone (its log-probabilities: what evaluation harnesses ask)
        Some(0) if echo => 0,
        Some(0) => {
            return Err(bad(format!(
                "`{key}` must be >= 1, not 0 (0 only with `echo`)"
            )))
        }
        m => m.unwrap_or(16),
    };
    let seed = match count("seed")? {
        Some(s) => s as u64,
        None => rand::random(),
    };
    Ok(Asked {
        params: SamplingParams {
            max_new_tokens,
            seed,
            logprobs: top,
            prompt_logprobs: echo && top.is_some(),
            ..p
        },
        n,
        top,
        echo,
    })
}

/// Sampling settings from a request, with OpenAI's defaults.
fn sampling(req: &Value) -> Result<SamplingParams, Failure> {
    let num = |k: &str| -> Result<Option<f64>, Failure> {
        match req.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| bad(format!("`{k}` must be a number"))),
        }
    };
    let count = |k: &str| -> Result<Option<usize>, Failure> {
        match num(k)? {
            None => Ok(None),
            Some(x) if x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as usize)),
            Some(x) => Err(bad(format!("`{k}` must be a whole number >= 0, not {x}"))),
        }
    };
    let stop = match req.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`stop` must be a string or a list of strings"))?,
        Some(_) => return Err(bad("`stop` must be a string or a list of strings")),
    };
    if stop.iter().any(String::is_empty) {
        return Err(bad(
            "`stop` holds an empty string, which would end every answer at once",
        ));
    }
    // OpenAI's ranges; petal's extensions top_k >= 0 and repetition_penalty > 0
    let within = |k: &str, v: Option<f64>, ok: fn(f64) -> bool, range: &str| match v {
        Some(x) if !ok(x) => Err(bad(format!("`{k}` must be {range}, not {x}"))),
        _ => Ok(v),
    };
    let temperature = within(
        "temperature",
        num("temperature")?,
        |t| (0.0..=2.0).contains(&t),
        "in 0..2",
    )?
    .unwrap_or(1.0);
    // below 1e-5 the softmax over 1/temperature overflows: greedy, as vLLM takes it
    let temperature = if temperature < 1e-5 { 0.0 } else { temperature };
    let top_p =
        within("top_p", num("top_p")?, |p| p > 0.0 && p <= 1.0, "in (0, 1]")?.filter(|p| *p < 1.0);
    let repetition_penalty = within(
        "repetition_penalty",
        num("repetition_penalty")?,
        |r| r > 0.0 && r.is_finite(),
        "> 0",
    )?
    .unwrap_or(1.0);
    Ok(SamplingParams {
        temperature,
        top_k: count("top_k")?.filter(|k| *k > 0),
        top_p,
        repetition_penalty,
        max_new_tokens: 16, // its range depends on `echo` (`asked`)
        stop,
        seed: 0,
        ..SamplingParams::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn error(body: Value) -> String {
        asked(&body, false)
            .err()
            .map(|Failure(_, _, m)| m)
            .unwrap_or_default()
    }

    #[test]
    fn sampling_fields_out_of_openai_ranges_are_refused_naming_the_field() {
        for (body, want) in [
            (json!({"temperature": 3}), "`temperature` must be in 0..2"),
            (json!({"temperature": -1}), "`temperature`"),
            (json!({"top_p": 2}), "`top_p` must be in (0, 1]"),
            (json!({"top_p": 0}), "`top_p`"),
            (
                json!({"repetition_penalty": 0}),
                "`repetition_penalty` must be > 0",
            ),
            (json!({"repetition_penalty": -1.5}), "`repetition_penalty`"),
            (json!({"n": 0}), "`n` must be >= 1"),
            (json!({"n": 1.5}), "`n` must be a whole number"),
            (json!({"max_tokens": 0}), "`max_tokens` must be >= 1"),
            (json!({"top_k": -1}), "`top_k`"),
            (json!({"logprobs": 21}), "`logprobs` must be in 0..=20"),
            (
                json!({"logprobs": true}),
                "`logprobs` must be a whole number",
            ),
            (json!({"echo": 1}), "`echo` must be true or false"),
            (
                json!({"echo": true, "stream": true}),
                "`echo` with `stream`",
            ),
        ] {
            let e = error(body.clone());
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn a_temperature_below_1e_5_is_greedy_and_top_p_1_is_no_filter() {
        let p = sampling(&json!({"temperature": 1e-60, "top_p": 1.0, "n": 1})).unwrap();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_p, None);
        let p = sampling(&json!({"temperature": 0.7})).unwrap();
        assert_eq!(p.temperature, 0.7);
    }

    #[test]
    fn logprobs_echo_and_n_read_the_completions_and_chat_forms() {
        let a = asked(
            &json!({"logprobs": 3, "echo": true, "max_tokens": 0, "n": 2, "seed": 7}),
            false,
        )
        .unwrap();
        assert_eq!((a.n, a.top, a.echo), (2, Some(3), true));
        assert_eq!((a.params.max_new_tokens, a.params.seed), (0, 7));
        assert!(a.params.prompt_logprobs && a.params.logprobs == Some(3));
        let a = asked(&json!({"logprobs": true, "top_logprobs": 5}), true).unwrap();
        assert_eq!(
            (a.top, a.echo, a.params.prompt_logprobs),
            (Some(5), false, false)
        );
        let a = asked(&json!({"echo": true}), true).unwrap();
        assert!(!a.echo, "chat has no echo");
        let e = asked(&json!({"top_logprobs": 2}), true).unwrap_err().2;
        assert!(e.contains("needs `logprobs`"), "{e}");
        let e = asked(&json!({"logprobs": true, "top_logprobs": 30}), true)
            .unwrap_err()
            .2;
        assert!(e.contains("`top_logprobs` must be in 0..=20"), "{e}");
        // chat's max_completion_tokens, OpenAI's name for max_tokens
        let a = asked(&json!({"max_completion_tokens": 5}), true).unwrap();
        assert_eq!(a.params.max_new_tokens, 5);
        let chat_error = |v: Value| asked(&v, true).unwrap_err().2;
        let e = chat_error(json!({"max_completion_tokens": -5}));
        assert!(
            e.contains("`max_completion_tokens` must be a whole number"),
            "{e}"
        );
        let e = chat_error(json!({"max_completion_tokens": 5, "max_tokens": 6}));
        assert!(e.contains("not both"), "{e}");
    }
}
