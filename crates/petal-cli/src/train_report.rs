//! What `petal train` prints and writes when a run ends: the summary (text or `--json`), the
//! loss sparkline and the loss chart of the run folder.

use anyhow::Result;
use petal_core::ParamCount;
use std::path::Path;

/// `loss.svg` in the run folder, from metrics.jsonl (the whole run, resumed parts included).
pub(crate) fn write_loss_chart(out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let series = |k: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .filter_map(|r| Some((r["step"].as_f64()?, r[k].as_f64()?)))
            .collect()
    };
    let svg = crate::plot::line_chart(
        "loss per step",
        &[
            ("train loss", "#c2185b", series("loss")),
            ("eval loss", "#1565c0", series("eval_loss")),
        ],
    );
    petal_io::write_atomic(&out.join("loss.svg"), svg.as_bytes())?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn print_report(
    s: &petal_train::TrainSummary,
    params: ParamCount,
    before: Option<petal_train::EvalResult>,
    after: Option<petal_train::EvalResult>,
    prompts: &[String],
    bs: &[String],
    as_: &[String],
    out: &Path,
    json: bool,
) -> Result<()> {
    if json {
        let mut times = s.step_seconds.clone();
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied();
        let v = serde_json::json!({
            "steps": s.steps, "seconds": s.seconds, "losses": s.losses, "train_examples": s.examples,
            "trainable_params": params.trainable, "total_params": params.total,
            "median_step_seconds": median, "peak_rss_mb": crate::bench_cmd::peak_rss_mb(),
            "eval_before": before, "eval_after": after, "adapter": s.adapter_dir,
            "samples": prompts.iter().zip(bs).zip(as_).map(|((p, b), a)| serde_json::json!({"prompt": p, "before": b, "after": a})).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "trained {} steps in {:.1} s; adapter saved to {}",
        s.steps,
        s.seconds,
        s.adapter_dir.display()
    );
    println!("loss curve (every step): {}", sparkline(&s.losses));
    match (before, after) {
        (Some(b), Some(a)) if a.accuracy.is_some() => println!(
            "validation loss: {:.4} -> {:.4}; accuracy {:.4} -> {:.4}; macro-F1 {:.4} -> {:.4}",
            b.loss,
            a.loss,
            b.accuracy.unwrap_or(0.0),
            a.accuracy.unwrap_or(0.0),
            b.macro_f1.unwrap_or(0.0),
            a.macro_f1.unwrap_or(0.0)
        ),
        (Some(b), Some(a)) => println!(
            "validation loss: {:.4} -> {:.4} (perplexity {:.2} -> {:.2})",
            b.loss, a.loss, b.perplexity, a.perplexity
        ),
        _ => {}
    }
    for ((p, b), a) in prompts.iter().zip(bs).zip(as_) {
        println!(
            "\nprompt: {p}\n  before: {}\n  after:  {}",
            b.replace('\n', "\n          "),
            a.replace('\n', "\n          ")
        );
    }
    println!(
        "\nmetrics: {} (chart: {})",
        out.join("metrics.jsonl").display(),
        out.join("loss.svg").display()
    );
    Ok(())
}

pub fn sparkline(v: &[f64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
    let span = (hi - lo).max(1e-9);
    let s: String = v
        .iter()
        .map(|&x| BARS[(((x - lo) / span) * 7.0).round() as usize])
        .collect();
    format!(
        "{s}  ({:.3} .. {:.3})",
        v.first().copied().unwrap_or(0.0),
        v.last().copied().unwrap_or(0.0)
    )
}
