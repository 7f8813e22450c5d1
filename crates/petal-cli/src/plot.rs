//! A small standalone SVG line chart of a run's metrics (training loss per step, eval loss
//! where measured), written next to metrics.jsonl as `loss.svg`.

use std::fmt::Write;

/// `series`: (label, colour, points (x, y)).
pub fn line_chart(title: &str, series: &[(&str, &str, Vec<(f64, f64)>)]) -> String {
    let (w, h, pad) = (640.0, 320.0, 48.0);
    let pts = series.iter().flat_map(|s| s.2.iter());
    let (x0, x1, y0, y1) = pts.fold(
        (f64::MAX, f64::MIN, f64::MAX, f64::MIN),
        |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
    );
    if x0 > x1 {
        return String::new();
    }
    let (sx, sy) = (
        (w - 2.0 * pad) / (x1 - x0).max(1e-9),
        (h - 2.0 * pad) / (y1 - y0).max(1e-9),
    );
    let px = |x: f64| pad + (x - x0) * sx;
    let py = |y: f64| h - pad - (y - y0) * sy;
    let mut s = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n");
    let _ = writeln!(s, "<text x='{pad}' y='20' font-size='14'>{title}</text>");
    let _ = writeln!(
        s,
        "<line x1='{pad}' y1='{}' x2='{}' y2='{}' stroke='#999'/>",
        h - pad,
        w - pad,
        h - pad
    );
    let _ = writeln!(
        s,
        "<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{}' stroke='#999'/>",
        h - pad
    );
    let _ = writeln!(
        s,
        "<text x='{}' y='{}' text-anchor='end'>{y1:.3}</text>",
        pad - 4.0,
        pad + 4.0
    );
    let _ = writeln!(
        s,
        "<text x='{}' y='{}' text-anchor='end'>{y0:.3}</text>",
        pad - 4.0,
        h - pad
    );
    let _ = writeln!(s, "<text x='{pad}' y='{}'>step {x0:.0}</text><text x='{}' y='{}' text-anchor='end'>step {x1:.0}</text>", h - pad + 16.0, w - pad, h - pad + 16.0);
    for (i, (label, colour, p)) in series.iter().enumerate() {
        let path: Vec<String> = p
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill='none' stroke='{colour}' stroke-width='2' points='{}'/>",
            path.join(" ")
        );
        for &(x, y) in p.iter().filter(|_| p.len() <= 50) {
            let _ = writeln!(
                s,
                "<circle cx='{:.1}' cy='{:.1}' r='2.5' fill='{colour}'/>",
                px(x),
                py(y)
            );
        }
        let ly = pad + 8.0 + 16.0 * i as f64;
        let _ = writeln!(s, "<rect x='{}' y='{}' width='12' height='4' fill='{colour}'/><text x='{}' y='{}'>{label}</text>", w - pad - 120.0, ly - 4.0, w - pad - 104.0, ly + 1.0);
    }
    s + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_map_linearly_onto_the_plot_area() {
        let svg = line_chart("t", &[("loss", "red", vec![(1.0, 4.0), (3.0, 2.0)])]);
        // first point at the left edge and top (max y), last at the right edge and bottom
        assert!(svg.contains("points='48.0,48.0 592.0,272.0'"), "{svg}");
    }
}
