//! The bench's summaries: medians and spreads of the measured steps, the ratio table, the SVG
//! chart.

use serde_json::{json, Value};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub(super) fn summarize(steps: &[Value], tokens: f64, flops: f64) -> Value {
    let col = |k: &str| {
        steps
            .iter()
            .filter_map(|s| s[k].as_f64())
            .collect::<Vec<_>>()
    };
    let tps: Vec<f64> = col("total").iter().map(|t| tokens / t).collect();
    let (lo, hi) = tps
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
    let med = median(tps.clone());
    json!({
        "tokens_per_s": med, "min": lo, "max": hi, "steps": tps.len(),
        "forward_s": median(col("forward")), "backward_s": median(col("backward")), "optimizer_s": median(col("optimizer")),
        "gflops": med * flops / 1e9,
    })
}

/// " (petal kernels: norm, rope)" for the CUDA kernel families a run used, else "".
fn kernels_note(v: &Value) -> String {
    let names: Vec<&str> = v
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    match names.len() {
        0 => String::new(),
        n if n == petal_ops::cuda::Family::ALL.len() => " (petal kernels: all)".into(),
        _ => format!(" (petal kernels: {})", names.join(", ")),
    }
}

pub(super) fn print_table(r: &Value) {
    let f = |v: &Value, k: &str| {
        v[k].as_f64()
            .map(|x| format!("{x:.3}"))
            .unwrap_or_else(|| "-".into())
    };
    println!("workload {} / {} ({}) | batch {} x {} | {} | {} | {} threads | matmul peak f32 {:.0} GFLOP/s, bf16 {} | {:.1} MFLOP/token",
        r["workload"].as_str().unwrap_or(""), r["mode"].as_str().unwrap_or(""), r["method"].as_str().unwrap_or("lora"), r["batch"], r["seq"], r["dtype"].as_str().unwrap_or(""), format!("{}{}", r["device"].as_str().unwrap_or("cpu"), kernels_note(&r["cuda_kernels"])), r["threads"],
        r["matmul_peak_gflops"]["f32"].as_f64().unwrap_or(0.0), r["matmul_peak_gflops"]["bf16"].as_f64().map(|x| format!("{x:.0}")).unwrap_or("-".into()), r["mflop_per_token"].as_f64().unwrap_or(0.0));
    if let Some(k) = r["unscored"].as_u64().filter(|&k| k > 0) {
        println!("the first {k} tokens of each sequence carry no loss (--prompt-fraction)");
    }
    if let Some(f) = r["cpu_features"].as_array() {
        let names: Vec<_> = f.iter().filter_map(|v| v.as_str()).collect();
        let quant =
            if r["dtype"] == "quantized" || r["quantize"].as_str().is_some_and(|q| !q.is_empty()) {
                format!(
                    " | frozen quantized products: {}",
                    r["frozen_quantized_products"].as_str().unwrap_or("-")
                )
            } else {
                String::new()
            };
        let names = if names.is_empty() {
            "none".to_string()
        } else {
            names.join(" ")
        };
        println!("cpu features: {names}{quant}");
    }
    let gpu = r["petal"]["gpu_peak_mb"].is_f64();
    println!(
        "{:<16} {:>10} {:>19} {:>9} {:>9} {:>9} {:>9} {:>10}{}",
        "",
        "tokens/s",
        "(min..max)",
        "fwd s",
        "bwd s",
        "opt s",
        "GFLOP/s",
        "peak MB",
        if gpu { "     GPU MB" } else { "" }
    );
    for name in ["petal", "pytorch", "pytorch_autocast"] {
        let v = &r[name];
        if v.is_null() {
            continue;
        }
        println!(
            "{:<16} {:>10.1} {:>19} {:>9} {:>9} {:>9} {:>9.1} {:>10.0}{}",
            name,
            v["tokens_per_s"].as_f64().unwrap_or(0.0),
            format!(
                "({:.1}..{:.1})",
                v["min"].as_f64().unwrap_or(0.0),
                v["max"].as_f64().unwrap_or(0.0)
            ),
            f(v, "forward_s"),
            f(v, "backward_s"),
            f(v, "optimizer_s"),
            v["gflops"].as_f64().unwrap_or(0.0),
            v["peak_rss_mb"].as_f64().unwrap_or(0.0),
            match v["gpu_peak_mb"].as_f64() {
                Some(m) if gpu => format!(" {m:>10.0}"),
                _ => String::new(),
            }
        );
    }
    for (key, what) in [
        ("ratio", "pytorch f32"),
        ("ratio_autocast", "pytorch bf16 autocast"),
    ] {
        if !r[key].is_null() {
            println!(
                "petal / {what}: tokens/s {:.2}x, peak RSS {:.2}x{}",
                r[key]["tokens_per_s"].as_f64().unwrap_or(0.0),
                r[key]["peak_rss"].as_f64().unwrap_or(0.0),
                r[key]["gpu_memory"]
                    .as_f64()
                    .map(|m| format!(", GPU memory {m:.2}x"))
                    .unwrap_or_default()
            );
        }
    }
}

/// Two bar groups (tokens/s, peak RSS) for petal and PyTorch, as a small standalone SVG.
pub(super) fn chart(r: &Value) -> String {
    let rows: Vec<(&str, f64, f64)> = ["petal", "pytorch", "pytorch_autocast"]
        .iter()
        .filter(|n| !r[**n].is_null())
        .map(|n| {
            (
                *n,
                r[*n]["tokens_per_s"].as_f64().unwrap_or(0.0),
                r[*n]["peak_rss_mb"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let max_t = rows.iter().map(|x| x.1).fold(1.0, f64::max);
    let max_m = rows.iter().map(|x| x.2).fold(1.0, f64::max);
    let mut s = String::from("<svg xmlns='http://www.w3.org/2000/svg' width='640' height='220' font-family='sans-serif' font-size='13'>\n");
    s += &format!(
        "<text x='10' y='20'>{} / {}: tokens/s (left) and peak RSS MB (right)</text>\n",
        r["workload"].as_str().unwrap_or(""),
        r["mode"].as_str().unwrap_or("")
    );
    for (i, (name, t, m)) in rows.iter().enumerate() {
        let y = 50 + i as i32 * 70;
        let color = if *name == "petal" {
            "#c2185b"
        } else {
            "#607d8b"
        };
        let wt = 240.0 * t / max_t;
        let wm = 240.0 * m / max_m;
        let label = name.strip_prefix("pytorch_").unwrap_or(name);
        s += &format!("<text x='10' y='{}'>{label}</text>\n", y + 18);
        s += &format!("<rect x='70' y='{y}' width='{wt:.0}' height='26' fill='{color}'/><text x='{:.0}' y='{}'>{t:.0}</text>\n", 75.0 + wt, y + 18);
        s += &format!("<rect x='370' y='{y}' width='{wm:.0}' height='26' fill='{color}' opacity='0.6'/><text x='{:.0}' y='{}'>{m:.0}</text>\n", 375.0 + wm, y + 18);
    }
    s + "</svg>\n"
}
