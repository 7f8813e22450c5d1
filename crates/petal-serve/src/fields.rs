//! The sampling fields of a completion request, checked against OpenAI's ranges (and petal's
//! own for its extensions): a value out of range is a 400 naming the field.

use crate::server::{bad, Failure};
use crate::SamplingParams;
use serde_json::Value;

/// Sampling settings from a request, with OpenAI's defaults.
pub(crate) fn sampling(req: &Value) -> Result<SamplingParams, Failure> {
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
    match count("n")? {
        None | Some(1) => {}
        Some(0) => return Err(bad("`n` must be >= 1, not 0")),
        Some(n) => {
            return Err(bad(format!(
                "`n` = {n}: one completion per request for now"
            )))
        }
    }
    let max_new_tokens = match count("max_tokens")? {
        Some(0) => return Err(bad("`max_tokens` must be >= 1, not 0")),
        m => m.unwrap_or(16),
    };
    Ok(SamplingParams {
        temperature,
        top_k: count("top_k")?.filter(|k| *k > 0),
        top_p,
        repetition_penalty,
        max_new_tokens,
        stop,
        seed: count("seed")?.unwrap_or(0) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn error(body: Value) -> String {
        sampling(&body)
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
            (json!({"n": 3}), "`n` = 3"),
            (json!({"max_tokens": 0}), "`max_tokens` must be >= 1"),
            (json!({"top_k": -1}), "`top_k`"),
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
}
