//! Choosing the next token from logits.

use rand::Rng;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// > 1 discourages tokens already present (CTRL-style, as transformers applies it).
    pub repetition_penalty: f64,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub seed: u64,
    /// Record each generated token's log-probability with this many alternatives (None: none).
    pub logprobs: Option<usize>,
    /// Record the prompt tokens' log-probabilities too (OpenAI's `echo` with `logprobs`).
    pub prompt_logprobs: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            max_new_tokens: 128,
            stop: Vec::new(),
            seed: 0,
            logprobs: None,
            prompt_logprobs: false,
        }
    }
}

/// transformers' RepetitionPenaltyLogitsProcessor: positive logits divided, negative multiplied.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let mut done = std::collections::HashSet::new();
    for &t in seen {
        if !done.insert(t) {
            continue;
        }
        if let Some(l) = logits.get_mut(t as usize) {
            *l = if *l > 0.0 {
                *l / penalty as f32
            } else {
                *l * penalty as f32
            };
        }
    }
}

/// Next token: argmax when greedy (temperatures below 1e-5, whose 1/t overflows the softmax,
/// included, as vLLM takes them), else sample after temperature, top-k and top-p filtering.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut impl Rng) -> u32 {
    if p.temperature < 1e-5 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = p.top_k.filter(|&k| k > 0) {
        idx.truncate(k);
    }
    let t = p.temperature as f32;
    let max = logits[idx[0]];
    let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i] - max) / t).exp()).collect();
    let z: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= z);
    if let Some(top_p) = p.top_p.filter(|&x| x < 1.0) {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= top_p as f32 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= z);
    }
    let u: f32 = rng.gen();
    let mut acc = 0.0;
    for (i, q) in probs.iter().enumerate() {
        acc += q;
        if u < acc {
            return idx[i] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

pub fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_both_reduce_sampling_to_argmax() {
        let l = vec![0.1, 3.0, 2.9, -1.0];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        for _ in 0..50 {
            let p = SamplingParams {
                temperature: 1.0,
                top_k: Some(1),
                ..Default::default()
            };
            assert_eq!(sample(&l, &p, &mut rng), 1);
            let p = SamplingParams {
                temperature: 1.0,
                top_p: Some(0.01),
                ..Default::default()
            };
            assert_eq!(sample(&l, &p, &mut rng), 1);
        }
    }

    #[test]
    fn sampling_frequencies_follow_the_softmax_of_logits_over_temperature() {
        let l = vec![0.0f32, (2.0f32).ln()]; // probabilities 1/3, 2/3 at t = 1
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let p = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let n = 20000;
        let ones = (0..n).filter(|_| sample(&l, &p, &mut rng) == 1).count() as f64 / n as f64;
        assert!((ones - 2.0 / 3.0).abs() < 0.015, "{ones}");
    }

    /// Frequencies against the distributions written out (transformers' order: temperature,
    /// then top-k, then top-p, each renormalised): t = 0.5 squares the odds; top-k 2 keeps the
    /// two largest; top-p 0.7 and 0.79 over (.5, .3, .2) keep the first two (their sum .8
    /// reaches both; transformers drops the tokens whose ascending cumulative sum is at most
    /// 1 - top_p, here .2).
    #[test]
    fn temperature_top_k_and_top_p_sample_from_their_renormalised_distributions() {
        let ln = |v: &[f64]| v.iter().map(|x| x.ln() as f32).collect::<Vec<f32>>();
        let cases: [(Vec<f32>, SamplingParams, Vec<f64>); 5] = [
            (
                ln(&[1.0, 2.0, 3.0]),
                SamplingParams {
                    temperature: 0.5,
                    ..Default::default()
                },
                vec![1.0 / 14.0, 4.0 / 14.0, 9.0 / 14.0],
            ),
            (
                ln(&[0.1, 0.4, 0.2, 0.3]),
                SamplingParams {
                    temperature: 1.0,
                    top_k: Some(2),
                    ..Default::default()
                },
                vec![0.0, 4.0 / 7.0, 0.0, 3.0 / 7.0],
            ),
            (
                ln(&[0.3, 0.5, 0.2]),
                SamplingParams {
                    temperature: 1.0,
                    top_p: Some(0.7),
                    ..Default::default()
                },
                vec![3.0 / 8.0, 5.0 / 8.0, 0.0],
            ),
            (
                ln(&[0.3, 0.5, 0.2]),
                SamplingParams {
                    temperature: 1.0,
                    top_p: Some(0.79),
                    ..Default::default()
                },
                vec![3.0 / 8.0, 5.0 / 8.0, 0.0],
            ),
            // temperature before top-p: at t = 0.5 the largest holds 25/38 = 0.66 >= 0.6 alone
            // (top-p first would keep two, then sample them 0.74 / 0.26)
            (
                ln(&[0.3, 0.5, 0.2]),
                SamplingParams {
                    temperature: 0.5,
                    top_p: Some(0.6),
                    ..Default::default()
                },
                vec![0.0, 1.0, 0.0],
            ),
        ];
        let n = 40000;
        for (i, (logits, p, want)) in cases.iter().enumerate() {
            let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64 + 3);
            let mut counts = vec![0usize; logits.len()];
            for _ in 0..n {
                counts[sample(logits, p, &mut rng) as usize] += 1;
            }
            for (j, (&c, &w)) in counts.iter().zip(want).enumerate() {
                let f = c as f64 / n as f64;
                // 4.5 standard errors of a frequency, and never a token filtered out
                let tol = 4.5 * (w * (1.0 - w) / n as f64).sqrt();
                assert!((f - w).abs() <= tol, "case {i}, token {j}: {f} vs {w}");
            }
        }
    }
}
