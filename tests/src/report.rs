//! The chart of an end-to-end load run (`fleet_e2e`), for a person to look at.
//!
//! [`write_chart`] draws one PNG of three stacked panels that share the time axis:
//!
//! 1. readings accepted by ingest per second;
//! 2. ingest→commit p99 in milliseconds, on a log scale when the values span at least
//!    [`LOG_SCALE_SPAN`]× (a fault turns 20 ms into 20 s), with gaps where nothing was committed;
//! 3. consumer lag in messages of the sink and evaluator groups.
//!
//! Each injected [`Fault`] is a dashed vertical line across the three panels, labelled with
//! its name and time in a strip above them.
//!
//! Text is drawn with DejaVu Sans, embedded in the binary by the `dejavu` crate and rasterised
//! by plotters' `ab_glyph` feature: rendering needs no system font library (fontconfig,
//! freetype) and gives the same picture on every machine.

use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One sample per second (or so) of the run.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Seconds since the run started.
    pub t_s: f64,
    /// Readings accepted by ingest per second.
    pub accepted_per_s: f64,
    /// Ingest→commit p99 over the last interval; `None` when nothing was committed.
    pub commit_p99_ms: Option<f64>,
    /// Messages: end offsets − offsets stored in PostgreSQL (sink group).
    pub sink_lag: f64,
    /// Messages: end offsets − offsets stored for the evaluator group.
    pub evaluator_lag: f64,
    /// Seconds: now − the 1-minute rollup's watermark (`None` before the first refresh).
    pub rollup_lag_s: Option<f64>,
    /// Cores busy on the whole machine over the last interval (`/proc/stat`; `None` for the
    /// first sample).
    pub busy_cores: Option<f64>,
    /// Devices the sink wrote to `device_latest` per second (timed flushes).
    pub latest_devices_per_s: f64,
    /// Readings the sink's rollup steps aggregated per second.
    pub rollup_readings_per_s: f64,
}

impl Sample {
    /// The columns of [`Sample::csv_row`].
    pub const CSV_HEADER: &'static str = "t_s,accepted_per_s,commit_p99_ms,sink_lag,\
        evaluator_lag,rollup_lag_s,busy_cores,latest_devices_per_s,rollup_readings_per_s";

    /// One line of `samples.csv` (an empty field where a figure is `None`).
    pub fn csv_row(&self) -> String {
        let opt =
            |v: Option<f64>, digits: usize| v.map_or(String::new(), |v| format!("{v:.digits$}"));
        format!(
            "{:.1},{:.0},{},{:.0},{:.0},{},{},{:.0},{:.0}",
            self.t_s,
            self.accepted_per_s,
            opt(self.commit_p99_ms, 1),
            self.sink_lag,
            self.evaluator_lag,
            opt(self.rollup_lag_s, 1),
            opt(self.busy_cores, 2),
            self.latest_devices_per_s,
            self.rollup_readings_per_s,
        )
    }
}

/// A fault injected during the run, drawn as a labelled vertical line.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Seconds since the run started.
    pub t_s: f64,
    /// What happened, e.g. "SIGKILL sink", "Kafka restart".
    pub label: String,
}

/// Size of the PNG in pixels: about two pixels per sample of a 10-minute run, and room for
/// three panels with legible tick labels.
pub const CHART_SIZE: (u32, u32) = (1600, 1100);

/// The p99 panel switches to a log scale when its largest value is at least this many times
/// its smallest: a linear axis would flatten the normal ~20 ms against a fault's seconds.
pub const LOG_SCALE_SPAN: f64 = 20.0;

/// The family every text of the chart uses, plotters' default; [`register_fonts`] binds it to
/// the embedded DejaVu Sans.
const FONT: &str = "sans-serif";
const TITLE_SIZE: f64 = 30.0;
const CAPTION_SIZE: f64 = 20.0;
const LABEL_SIZE: f64 = 15.0;

/// Space around each panel.
const MARGIN: u32 = 14;
/// Space right of each panel: the last time tick's label is centred on the plot's edge and
/// would be cut with [`MARGIN`] alone.
const MARGIN_RIGHT: u32 = 36;
/// Space above the title: ab_glyph places glyphs a little above the text box plotters asks
/// for, which cuts the tops of a title drawn flush with the image's edge.
const TITLE_TOP: u32 = 10;
/// Width of the y label area, the same on every panel so that their time axes line up pixel
/// for pixel and one fault line is one x across the chart.
const Y_LABEL_AREA: u32 = 80;
/// Height of the x label area of the two upper panels (tick labels) and of the bottom one
/// (tick labels and the axis name).
const X_LABEL_AREA: u32 = 28;
const X_LABEL_AREA_BOTTOM: u32 = 52;

/// Height of one row of fault labels; labels that would overlap go to the next row, up to
/// [`MAX_FAULT_ROWS`] rows, after which they are allowed to overlap.
const FAULT_ROW_HEIGHT: u32 = 22;
const MAX_FAULT_ROWS: usize = 4;
/// Horizontal gap between a fault line and its label, and between two labels on a row.
const FAULT_LABEL_GAP: i32 = 5;

const ACCEPTED_COLOR: RGBColor = RGBColor(31, 119, 180);
const P99_COLOR: RGBColor = RGBColor(148, 103, 189);
const SINK_COLOR: RGBColor = RGBColor(44, 160, 44);
const EVALUATOR_COLOR: RGBColor = RGBColor(255, 127, 14);
const FAULT_COLOR: RGBColor = RGBColor(214, 39, 40);
const NOTE_COLOR: RGBColor = RGBColor(110, 110, 110);

/// Writes a PNG of [`CHART_SIZE`] to `path`: three stacked panels sharing the time axis —
/// accepted msg/s, ingest→commit p99 (ms), consumer lag of the sink and evaluator — with each
/// fault as a labelled vertical line across them, under `title`.
///
/// Degenerate runs still give a file and `Ok`, so a failed run leaves a chart behind:
/// no samples at all gives the title and a "no samples" note; a single sample, or a series
/// broken by gaps, is drawn as dots where there is no neighbour to join. Non-finite values
/// are left out like a missing p99.
///
/// # Errors
///
/// The embedded font failing to load, or drawing or writing the file failing (for instance
/// when the parent directory does not exist).
pub fn write_chart(
    path: &Path,
    title: &str,
    samples: &[Sample],
    faults: &[Fault],
) -> anyhow::Result<()> {
    register_fonts()?;
    let root = BitMapBackend::new(path, CHART_SIZE).into_drawing_area();
    draw_chart(&root, title, samples, faults)
        .with_context(|| format!("drawing chart {}", path.display()))?;
    root.present()
        .with_context(|| format!("writing chart {}", path.display()))?;
    Ok(())
}

/// Binds [`FONT`] to the embedded DejaVu Sans (regular and bold) in plotters' font table.
///
/// The table is process-wide; registering again replaces an entry with the same bytes, so
/// every call of [`write_chart`] does it rather than tracking whether it was done.
fn register_fonts() -> anyhow::Result<()> {
    plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("embedded DejaVu Sans regular is not a valid font"))?;
    plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold())
        .map_err(|_| anyhow!("embedded DejaVu Sans bold is not a valid font"))?;
    Ok(())
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    samples: &[Sample],
    faults: &[Fault],
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    // `FontDesc::style` keeps the regular glyphs; building the font with its style loads bold.
    let title_font = (FONT, TITLE_SIZE, FontStyle::Bold).into_font();
    let body = root.margin(TITLE_TOP, 0, 0, 0).titled(title, title_font)?;
    if samples.is_empty() {
        let (w, h) = body.dim_in_pixel();
        let note = format!("no samples ({} faults injected)", faults.len());
        let style = (FONT, CAPTION_SIZE)
            .into_font()
            .color(&NOTE_COLOR)
            .pos(Pos::new(HPos::Center, VPos::Center));
        return body.draw(&Text::new(note, (w as i32 / 2, h as i32 / 2), style));
    }

    let time = time_range(samples, faults);
    let label_style = TextStyle::from((FONT, LABEL_SIZE).into_font());

    // Fault labels are laid out before the panels exist, so their rows use the x a panel will
    // give; plotters maps the same way, to within a pixel, and the gap absorbs that.
    let (width, _) = body.dim_in_pixel();
    let plot_x = (MARGIN + Y_LABEL_AREA) as i32..(width - MARGIN_RIGHT) as i32;
    let mut labels = Vec::with_capacity(faults.len());
    for fault in faults.iter().filter(|f| f.t_s.is_finite()) {
        let text = format!("{} @ {}", fault.label, format_clock(fault.t_s));
        let (text_w, _) = body.estimate_text_size(&text, &label_style)?;
        labels.push((fault.t_s, text, text_w as i32));
    }
    let rows = layout_fault_labels(&labels, &time, &plot_x);
    let row_count = rows.iter().map(|r| r + 1).max().unwrap_or(0);
    let strip_height = if row_count == 0 {
        0
    } else {
        row_count as u32 * FAULT_ROW_HEIGHT + 6
    };
    let (strip, panels) = body.split_vertically(strip_height);
    let panels = panels.split_evenly((3, 1));
    let [accepted_area, p99_area, lag_area] = panels.as_slice() else {
        // split_evenly((rows, cols)) returns rows × cols areas.
        unreachable!("split_evenly((3, 1)) gives three areas");
    };

    // The same faults as `labels`, in the same order.
    let fault_ts: Vec<f64> = labels.iter().map(|(t_s, _, _)| *t_s).collect();

    let pixel_xs = draw_accepted_panel(accepted_area, samples, &fault_ts, &time)?;
    draw_p99_panel(p99_area, samples, &fault_ts, &time)?;
    draw_lag_panel(lag_area, samples, &fault_ts, &time)?;

    // Labels and their connectors, in the strip, at the x the top panel gave each fault.
    let (_, strip_y) = strip.get_base_pixel();
    let strip_bottom = strip_y + strip_height as i32;
    let fault_style = ShapeStyle::from(&FAULT_COLOR).stroke_width(1);
    for (((_, text, text_w), row), px) in labels.iter().zip(&rows).zip(&pixel_xs) {
        let row_top = strip_y + (*row as u32 * FAULT_ROW_HEIGHT) as i32 + 3;
        let left = label_left(*px, *text_w, &plot_x);
        root.draw(&DashedPathElement::new(
            vec![(*px, row_top), (*px, strip_bottom)],
            4,
            3,
            fault_style,
        ))?;
        root.draw(&Text::new(
            text.clone(),
            (left, row_top + 1),
            label_style.color(&FAULT_COLOR),
        ))?;
    }
    Ok(())
}

/// Time axis of all panels: from the run's start (or the earliest sample or fault, if
/// negative) to the last sample or fault, at least one second long.
fn time_range(samples: &[Sample], faults: &[Fault]) -> Range<f64> {
    let ts = samples
        .iter()
        .map(|s| s.t_s)
        .chain(faults.iter().map(|f| f.t_s))
        .filter(|t| t.is_finite());
    let (lo, hi) = ts.fold((0.0_f64, 0.0_f64), |(lo, hi), t| (lo.min(t), hi.max(t)));
    lo..hi.max(lo + 1.0)
}

/// Left x of a fault's label: right of its line, or left of it when it would run past the
/// plot's right edge.
fn label_left(px: i32, text_w: i32, plot_x: &Range<i32>) -> i32 {
    if px + FAULT_LABEL_GAP + text_w <= plot_x.end {
        px + FAULT_LABEL_GAP
    } else {
        (px - FAULT_LABEL_GAP - text_w).max(0)
    }
}

/// Row of each fault label: the first row where it clears the labels already placed, in time
/// order; when none does, the row whose last label ends first.
fn layout_fault_labels(
    labels: &[(f64, String, i32)],
    time: &Range<f64>,
    plot_x: &Range<i32>,
) -> Vec<usize> {
    let span = time.end - time.start;
    let width = f64::from(plot_x.end - plot_x.start);
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_by(|&a, &b| labels[a].0.total_cmp(&labels[b].0));
    // Right edge of the last label placed on each row.
    let mut row_ends: Vec<i32> = Vec::new();
    let mut rows = vec![0; labels.len()];
    for i in order {
        let (t_s, _, text_w) = &labels[i];
        let px = plot_x.start + ((t_s - time.start) / span * width).round() as i32;
        let left = label_left(px, *text_w, plot_x).min(px);
        let right = (left + text_w).max(px);
        let row = match row_ends
            .iter()
            .position(|&end| end + FAULT_LABEL_GAP * 2 <= left)
        {
            Some(row) => row,
            None if row_ends.len() < MAX_FAULT_ROWS => {
                row_ends.push(i32::MIN);
                row_ends.len() - 1
            }
            None => row_ends
                .iter()
                .enumerate()
                .min_by_key(|(_, end)| **end)
                .map_or(0, |(row, _)| row),
        };
        row_ends[row] = right;
        rows[i] = row;
    }
    rows
}

/// Accepted readings per second; returns the pixel x of each fault, for the label strip.
fn draw_accepted_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    samples: &[Sample],
    faults: &[f64],
    time: &Range<f64>,
) -> Result<Vec<i32>, DrawingAreaErrorKind<DB::ErrorType>> {
    let y = linear_range(samples.iter().map(|s| s.accepted_per_s));
    let mut chart = ChartBuilder::on(area)
        .caption("accepted by ingest (readings/s)", (FONT, CAPTION_SIZE))
        .margin(MARGIN)
        .margin_right(MARGIN_RIGHT)
        .x_label_area_size(X_LABEL_AREA)
        .y_label_area_size(Y_LABEL_AREA)
        .build_cartesian_2d(ClockAxis(time.clone()), y.clone())?;
    configure_mesh(&mut chart, false)?;
    let points = segments(samples, |s| Some(s.accepted_per_s));
    draw_segments(&mut chart, &points, ACCEPTED_COLOR)?;
    draw_fault_lines(&mut chart, faults, &y)?;
    Ok(faults
        .iter()
        .map(|t| chart.backend_coord(&(*t, y.start)).0)
        .collect())
}

/// Ingest→commit p99, log scale when the values span [`LOG_SCALE_SPAN`]× or more.
fn draw_p99_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    samples: &[Sample],
    faults: &[f64],
    time: &Range<f64>,
) -> DrawResult<DB> {
    let positive = samples
        .iter()
        .filter_map(|s| s.commit_p99_ms)
        .filter(|v| v.is_finite() && *v > 0.0);
    let (min, max) = positive.fold((f64::INFINITY, 0.0_f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let mut builder = ChartBuilder::on(area);
    builder
        .margin(MARGIN)
        .margin_right(MARGIN_RIGHT)
        .x_label_area_size(X_LABEL_AREA)
        .y_label_area_size(Y_LABEL_AREA);
    if max > 0.0 && max / min >= LOG_SCALE_SPAN {
        // From the power of ten below the lowest value, so that the usual p99 has a labelled
        // tick under it.
        let y = 10_f64.powf((min / 1.2).log10().floor())..(max * 1.5);
        let mut chart = builder
            .caption("ingest → commit p99 (ms, log scale)", (FONT, CAPTION_SIZE))
            .build_cartesian_2d(ClockAxis(time.clone()), y.clone().log_scale())?;
        configure_mesh(&mut chart, false)?;
        // A p99 of 0 ms cannot sit on a log axis: it is drawn on the axis's floor.
        let points = segments(samples, |s| s.commit_p99_ms.map(|v| v.max(y.start)));
        draw_segments(&mut chart, &points, P99_COLOR)?;
        draw_fault_lines(&mut chart, faults, &y)
    } else {
        let y = linear_range(samples.iter().filter_map(|s| s.commit_p99_ms));
        let mut chart = builder
            .caption("ingest → commit p99 (ms)", (FONT, CAPTION_SIZE))
            .build_cartesian_2d(ClockAxis(time.clone()), y.clone())?;
        configure_mesh(&mut chart, false)?;
        let points = segments(samples, |s| s.commit_p99_ms);
        if points.is_empty() {
            let (w, h) = chart.plotting_area().dim_in_pixel();
            let style = (FONT, CAPTION_SIZE)
                .into_font()
                .color(&NOTE_COLOR)
                .pos(Pos::new(HPos::Center, VPos::Center));
            chart.plotting_area().strip_coord_spec().draw(&Text::new(
                "nothing committed",
                (w as i32 / 2, h as i32 / 2),
                style,
            ))?;
        }
        draw_segments(&mut chart, &points, P99_COLOR)?;
        draw_fault_lines(&mut chart, faults, &y)
    }
}

/// Consumer lag of the sink and evaluator groups, with a legend.
fn draw_lag_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    samples: &[Sample],
    faults: &[f64],
    time: &Range<f64>,
) -> DrawResult<DB> {
    let y = linear_range(samples.iter().flat_map(|s| [s.sink_lag, s.evaluator_lag]));
    let mut chart = ChartBuilder::on(area)
        .caption("consumer lag (messages)", (FONT, CAPTION_SIZE))
        .margin(MARGIN)
        .margin_right(MARGIN_RIGHT)
        .x_label_area_size(X_LABEL_AREA_BOTTOM)
        .y_label_area_size(Y_LABEL_AREA)
        .build_cartesian_2d(ClockAxis(time.clone()), y.clone())?;
    configure_mesh(&mut chart, true)?;
    for (name, color, value) in [
        (
            "sink",
            SINK_COLOR,
            (|s: &Sample| s.sink_lag) as fn(&Sample) -> f64,
        ),
        ("evaluator", EVALUATOR_COLOR, |s: &Sample| s.evaluator_lag),
    ] {
        // The legend entry sits on an empty series so that a line broken into several
        // segments is listed once.
        chart
            .draw_series(std::iter::empty::<PathElement<(f64, f64)>>())?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        draw_segments(&mut chart, &segments(samples, |s| Some(value(s))), color)?;
    }
    draw_fault_lines(&mut chart, faults, &y)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, LABEL_SIZE))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
}

/// A linear y range from 0 (or the lowest value, if negative) to 10 % above the highest finite
/// value, at least 1 tall so that an all-zero series still gets an axis.
fn linear_range(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((0.0_f64, 0.0_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let hi = hi + (hi - lo) * 0.1;
    lo..hi.max(lo + 1.0)
}

/// The time axis: linear in seconds, with ticks on round clock values (10 s, 30 s, 1 min,
/// 5 min, …) labelled m:ss, rather than plotters' decimal ticks (0:50, 1:40, …).
#[derive(Debug, Clone)]
struct ClockAxis(Range<f64>);

impl ClockAxis {
    /// At most this many labelled ticks; light grid lines go halfway between them.
    const MAX_TICKS: f64 = 12.0;
    const STEPS_S: [f64; 14] = [
        1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
    ];

    fn step(&self) -> f64 {
        let span = self.0.end - self.0.start;
        Self::STEPS_S
            .iter()
            .copied()
            .find(|step| span / step <= Self::MAX_TICKS)
            .unwrap_or_else(|| (span / Self::MAX_TICKS / 3600.0).ceil() * 3600.0)
    }

    fn ticks(&self, step: f64) -> Vec<f64> {
        let first = (self.0.start / step).ceil() as i64;
        let last = (self.0.end / step).floor() as i64;
        (first..=last).map(|i| i as f64 * step).collect()
    }
}

impl Ranged for ClockAxis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        RangedCoordf64::from(self.0.clone()).map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        let step = self.step();
        if hint.weight().allow_light_points() {
            self.ticks(step / 2.0)
        } else {
            self.ticks(step)
        }
    }

    fn range(&self) -> Range<f64> {
        self.0.clone()
    }
}

impl ValueFormatter<f64> for ClockAxis {
    fn format(value: &f64) -> String {
        format_clock(*value)
    }
}

/// Grid, tick labels (time as m:ss, values as 20k / 1.5M) and, on the bottom panel, the name
/// of the time axis.
fn configure_mesh<DB, Y>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<ClockAxis, Y>>,
    bottom: bool,
) -> DrawResult<DB>
where
    DB: DrawingBackend,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let mut mesh = chart.configure_mesh();
    mesh.y_label_formatter(&|v| format_quantity(*v))
        .y_labels(6)
        .label_style((FONT, LABEL_SIZE))
        .light_line_style(BLACK.mix(0.05))
        .bold_line_style(BLACK.mix(0.15));
    if bottom {
        mesh.x_desc("time since start (m:ss)")
            .axis_desc_style((FONT, LABEL_SIZE));
    }
    mesh.draw()
}

/// Consecutive samples whose value is present and finite, as connected lines; a missing or
/// non-finite value (or time) breaks the line.
fn segments(samples: &[Sample], value: impl Fn(&Sample) -> Option<f64>) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current = Vec::new();
    for s in samples {
        match value(s) {
            Some(v) if v.is_finite() && s.t_s.is_finite() => current.push((s.t_s, v)),
            _ if !current.is_empty() => out.push(std::mem::take(&mut current)),
            _ => {}
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Draws each segment as a line, and a segment of one point (no neighbour to join) as a dot.
fn draw_segments<DB, CT>(
    chart: &mut ChartContext<'_, DB, CT>,
    segments: &[Vec<(f64, f64)>],
    color: RGBColor,
) -> DrawResult<DB>
where
    DB: DrawingBackend,
    CT: CoordTranslate<From = (f64, f64)>,
{
    for segment in segments {
        if let [point] = segment.as_slice() {
            chart.draw_series(std::iter::once(Circle::new(*point, 3, color.filled())))?;
        } else {
            chart.draw_series(LineSeries::new(
                segment.iter().copied(),
                color.stroke_width(2),
            ))?;
        }
    }
    Ok(())
}

/// One dashed vertical line per fault, across the panel's whole y range.
fn draw_fault_lines<DB, CT>(
    chart: &mut ChartContext<'_, DB, CT>,
    faults: &[f64],
    y: &Range<f64>,
) -> DrawResult<DB>
where
    DB: DrawingBackend,
    CT: CoordTranslate<From = (f64, f64)>,
{
    let style = ShapeStyle::from(&FAULT_COLOR).stroke_width(2);
    chart.draw_series(
        faults
            .iter()
            .map(|t| DashedPathElement::new(vec![(*t, y.start), (*t, y.end)], 6, 4, style)),
    )?;
    Ok(())
}

/// Seconds as `m:ss`, or `h:mm:ss` from an hour on; rounded to the second.
fn format_clock(t_s: f64) -> String {
    let sign = if t_s < 0.0 { "-" } else { "" };
    let total = t_s.abs().round() as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{sign}{h}:{m:02}:{s:02}")
    } else {
        format!("{sign}{m}:{s:02}")
    }
}

/// A value with a k/M/G suffix and at most one decimal: 20000 → "20k", 1500000 → "1.5M",
/// 0.25 → "0.25".
fn format_quantity(v: f64) -> String {
    let abs = v.abs();
    let (scaled, suffix) = if abs >= 1e9 {
        (v / 1e9, "G")
    } else if abs >= 1e6 {
        (v / 1e6, "M")
    } else if abs >= 1e3 {
        (v / 1e3, "k")
    } else if abs >= 1.0 || abs == 0.0 {
        (v, "")
    } else {
        return format!("{}", (v * 100.0).round() / 100.0);
    };
    let text = format!("{scaled:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_one_csv_line_with_empty_fields_for_missing_figures() {
        let sample = Sample {
            t_s: 12.34,
            accepted_per_s: 19_950.4,
            commit_p99_ms: None,
            sink_lag: 1_200.0,
            evaluator_lag: 30.0,
            rollup_lag_s: Some(71.26),
            busy_cores: Some(1.876),
            latest_devices_per_s: 6_650.0,
            rollup_readings_per_s: 0.0,
        };
        assert_eq!(sample.csv_row(), "12.3,19950,,1200,30,71.3,1.88,6650,0");
        assert_eq!(
            Sample::CSV_HEADER.split(',').count(),
            sample.csv_row().split(',').count()
        );
    }

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let dir = std::env::temp_dir().join(format!(
                "fleetstream-report-{name}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Width and height from a PNG's IHDR chunk, after checking the signature and that the
    /// file ends with an IEND chunk (so it was written whole).
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert!(
            bytes.len() > 33,
            "too short for a PNG: {} bytes",
            bytes.len()
        );
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk is IHDR");
        assert_eq!(
            &bytes[bytes.len() - 8..bytes.len() - 4],
            b"IEND",
            "ends with IEND"
        );
        let be = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        (be(16), be(20))
    }

    /// A 10-minute run at 20,000 msg/s: the sink is killed at 2:00 (sink lag builds, nothing
    /// committed for 8 s), Kafka restarts at 5:00 (ingest stalls, p99 reaches seconds) and the
    /// evaluator is killed at 7:30 (evaluator lag builds and drains).
    fn synthetic_run() -> (Vec<Sample>, Vec<Fault>) {
        let samples = (0..600)
            .map(|i| {
                let t = f64::from(i);
                let wobble = (t * 0.7).sin() * 400.0 + (t * 0.13).cos() * 250.0;
                let mut sample = Sample {
                    t_s: t,
                    accepted_per_s: 20_000.0 + wobble,
                    commit_p99_ms: Some(22.0 + (t * 0.3).sin().abs() * 8.0),
                    sink_lag: 1_500.0 + wobble.abs(),
                    evaluator_lag: 800.0 + wobble.abs() / 2.0,
                    rollup_lag_s: Some(70.0 + (t % 10.0)),
                    ..Sample::default()
                };
                if (120.0..128.0).contains(&t) {
                    sample.commit_p99_ms = None;
                }
                if (120.0..160.0).contains(&t) {
                    let rise = (t - 120.0).min(8.0) * 20_000.0;
                    let drain = (t - 128.0).max(0.0) * 5_000.0;
                    sample.sink_lag += rise - drain;
                    if (128.0..140.0).contains(&t) {
                        sample.commit_p99_ms = Some(8_000.0 - (t - 128.0) * 600.0);
                    }
                }
                if (300.0..315.0).contains(&t) {
                    sample.accepted_per_s = 0.0;
                    sample.commit_p99_ms = Some(20_000.0);
                }
                if (315.0..330.0).contains(&t) {
                    sample.accepted_per_s = 30_000.0;
                    sample.commit_p99_ms = Some(2_500.0);
                }
                if (450.0..500.0).contains(&t) {
                    let rise = (t - 450.0).min(6.0) * 20_000.0;
                    let drain = (t - 456.0).max(0.0) * 3_000.0;
                    sample.evaluator_lag += (rise - drain).max(0.0);
                }
                sample
            })
            .collect();
        let faults = vec![
            Fault {
                t_s: 120.0,
                label: "SIGKILL sink".into(),
            },
            Fault {
                t_s: 300.0,
                label: "Kafka restart".into(),
            },
            Fault {
                t_s: 450.0,
                label: "SIGKILL evaluator".into(),
            },
        ];
        (samples, faults)
    }

    #[test]
    fn ten_minute_run_with_faults_renders_to_a_png_of_chart_size() -> anyhow::Result<()> {
        let dir = TempDir::new("run");
        let path = dir.0.join("fleet_e2e.png");
        let (samples, faults) = synthetic_run();
        write_chart(
            &path,
            "fleet_e2e: 100,000 devices, 20,000 msg/s",
            &samples,
            &faults,
        )?;
        let bytes = std::fs::read(&path)?;
        assert_eq!(png_size(&bytes), CHART_SIZE);
        // A blank or text-only image compresses to a few KiB; three drawn panels do not.
        assert!(
            bytes.len() > 30_000,
            "suspiciously small PNG: {} bytes",
            bytes.len()
        );
        Ok(())
    }

    #[test]
    fn empty_run_writes_a_chart_with_a_no_samples_note() -> anyhow::Result<()> {
        let dir = TempDir::new("empty");
        let path = dir.0.join("empty.png");
        write_chart(&path, "fleet_e2e: no data", &[], &[])?;
        assert_eq!(png_size(&std::fs::read(&path)?), CHART_SIZE);
        Ok(())
    }

    #[test]
    fn single_sample_and_a_fault_render_without_panicking() -> anyhow::Result<()> {
        let dir = TempDir::new("single");
        let path = dir.0.join("single.png");
        let samples = [Sample {
            t_s: 0.0,
            accepted_per_s: 100.0,
            commit_p99_ms: None,
            ..Sample::default()
        }];
        let faults = [Fault {
            t_s: 0.0,
            label: "SIGKILL sink".into(),
        }];
        write_chart(&path, "fleet_e2e: one sample", &samples, &faults)?;
        assert_eq!(png_size(&std::fs::read(&path)?), CHART_SIZE);
        Ok(())
    }

    #[test]
    fn missing_directory_is_an_error_not_a_panic() {
        let dir = TempDir::new("missing");
        let path = dir.0.join("no-such-dir").join("chart.png");
        let (samples, faults) = synthetic_run();
        assert!(write_chart(&path, "fleet_e2e", &samples, &faults).is_err());
    }

    #[test]
    fn p99_line_breaks_where_nothing_was_committed() {
        let samples: Vec<Sample> = [Some(20.0), Some(21.0), None, Some(f64::NAN), Some(30.0)]
            .into_iter()
            .enumerate()
            .map(|(i, p99)| Sample {
                t_s: i as f64,
                commit_p99_ms: p99,
                ..Sample::default()
            })
            .collect();
        let lines = segments(&samples, |s| s.commit_p99_ms);
        assert_eq!(
            lines,
            vec![vec![(0.0, 20.0), (1.0, 21.0)], vec![(4.0, 30.0)]]
        );
    }

    #[test]
    fn close_fault_labels_go_to_separate_rows() {
        let labels = vec![
            (100.0, "Kafka restart".to_owned(), 120),
            (101.0, "SIGKILL sink".to_owned(), 110),
            (400.0, "SIGKILL evaluator".to_owned(), 150),
        ];
        let rows = layout_fault_labels(&labels, &(0.0..600.0), &(100..1500));
        assert_eq!(rows, vec![0, 1, 0]);
    }

    #[test]
    fn tick_labels_read_as_clock_and_quantities() {
        assert_eq!(format_clock(0.0), "0:00");
        assert_eq!(format_clock(150.0), "2:30");
        assert_eq!(format_clock(3_725.0), "1:02:05");
        assert_eq!(format_quantity(20_000.0), "20k");
        assert_eq!(format_quantity(1_500_000.0), "1.5M");
        assert_eq!(format_quantity(250.0), "250");
        assert_eq!(format_quantity(0.25), "0.25");
    }
}
