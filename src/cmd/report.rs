//! `moelab report --run RUN... --out FILE.svg|FILE.html`: training and validation loss
//! curves of one or more runs from their metrics.jsonl (SVG via plotters; the HTML form
//! wraps the SVG with a summary table and needs no network).

use anyhow::{bail, Context, Result};
use clap::Args;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:\n  moelab report --run runs/shk --out docs/loss.svg\n  moelab report --run runs/moe runs/dense --out report.html";

#[derive(Args)]
pub struct ReportArgs {
    /// Run dirs to plot.
    #[arg(long, num_args = 1.., required = true)]
    run: Vec<PathBuf>,
    /// Output file: .svg (the chart) or .html (chart + summary table).
    #[arg(long)]
    out: PathBuf,
    /// Chart title.
    #[arg(long, default_value = "moelab: loss")]
    title: String,
}

struct Curves {
    name: String,
    /// (tokens seen, train loss averaged over a window)
    train: Vec<(f64, f64)>,
    /// (tokens seen, validation loss)
    val: Vec<(f64, f64)>,
    last_step: u64,
}

fn read(run: &Path) -> Result<Curves> {
    let path = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: no metrics.jsonl (is it a run dir?)", run.display()))?;
    let (mut raw, mut val) = (vec![], vec![]);
    let mut tokens_per_step = 0.0;
    let mut last_step = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: malformed line", path.display()))?;
        let step = v["step"].as_u64().unwrap_or(0);
        if let (Some(l), Some(t)) = (v["loss"].as_f64(), v["tokens_seen"].as_f64()) {
            raw.push((t, l));
            tokens_per_step = t / step.max(1) as f64;
            last_step = step;
        }
        if let Some(l) = v["val_loss"].as_f64() {
            val.push((step as f64 * tokens_per_step, l));
        }
    }
    if raw.is_empty() {
        bail!("{}: no training steps recorded yet", path.display());
    }
    // window mean over ~2% of the run: the raw per-step loss is noisy
    let w = (raw.len() / 50).max(1);
    let train = raw
        .windows(w)
        .map(|win| {
            (
                win[w - 1].0,
                win.iter().map(|x| x.1).sum::<f64>() / w as f64,
            )
        })
        .collect();
    let name = run.file_name().map_or_else(
        || run.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Ok(Curves {
        name,
        train,
        val,
        last_step,
    })
}

fn chart(curves: &[Curves], title: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let xmax = curves
            .iter()
            .flat_map(|c| c.train.iter().map(|p| p.0))
            .fold(1.0, f64::max)
            / 1e6;
        let ys = curves
            .iter()
            .flat_map(|c| c.train.iter().chain(&c.val).map(|p| p.1));
        let (ymin, ymax) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
        let mut ch = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..xmax, (ymin - 0.1).max(0.0)..ymax + 0.1)?;
        ch.configure_mesh()
            .x_desc("training tokens (millions)")
            .y_desc("loss (nats/token)")
            .draw()?;
        for (i, c) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            ch.draw_series(LineSeries::new(
                c.train.iter().map(|p| (p.0 / 1e6, p.1)),
                color.stroke_width(1),
            ))?
            .label(format!("{} train", c.name))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(1))
            });
            ch.draw_series(LineSeries::new(
                c.val.iter().map(|p| (p.0 / 1e6, p.1)),
                color.stroke_width(3),
            ))?
            .label(format!("{} val", c.name))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(3))
            });
        }
        ch.configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

pub fn run(a: ReportArgs) -> Result<()> {
    let curves: Vec<Curves> = a.run.iter().map(|r| read(r)).collect::<Result<_>>()?;
    let svg = chart(&curves, &a.title)?;
    let body = match a.out.extension().and_then(|e| e.to_str()) {
        Some("svg") => svg,
        Some("html") => {
            let rows: String = curves
                .iter()
                .map(|c| {
                    let v = c.val.last().map_or("-".into(), |v| format!("{:.4}", v.1));
                    format!(
                        "<tr><td>{}</td><td>{}</td><td>{v}</td></tr>",
                        c.name, c.last_step
                    )
                })
                .collect();
            format!("<!doctype html><meta charset=utf-8><title>{0}</title><h1>{0}</h1>{svg}<table border=1 cellpadding=4><tr><th>run</th><th>steps</th><th>last val loss</th></tr>{rows}</table>", a.title)
        }
        _ => bail!("--out must end in .svg or .html"),
    };
    data::write_atomic(&a.out, body.as_bytes())?;
    println!("wrote {}", a.out.display());
    Ok(())
}
