//! Reading the services' Prometheus `/metrics`: counters and histograms summed over label
//! sets, and deltas between scrapes that survive a process restart (counters back to zero).

/// A histogram: cumulative counts per upper bound (`le`), `+Inf` last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub cumulative: Vec<f64>,
}

impl Histogram {
    /// Observations in all.
    pub fn count(&self) -> f64 {
        self.cumulative.last().copied().unwrap_or(0.0)
    }

    /// The `q` quantile, interpolated linearly inside its bucket (as PromQL's
    /// `histogram_quantile`); `None` without observations. Observations above the last finite
    /// bound report that bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut below = 0.0;
        let mut lower = 0.0;
        for (bound, cumulative) in self.bounds.iter().zip(&self.cumulative) {
            if *cumulative >= rank {
                if bound.is_infinite() {
                    return Some(lower);
                }
                let inside = cumulative - below;
                let fraction = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some(lower + (bound - lower) * fraction);
            }
            below = *cumulative;
            lower = *bound;
        }
        Some(lower)
    }

    /// `self − earlier`, bucket by bucket; when a count went down the process restarted and
    /// `self` is all new.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        if earlier.bounds != self.bounds
            || self
                .cumulative
                .iter()
                .zip(&earlier.cumulative)
                .any(|(now, then)| now < then)
        {
            return self.clone();
        }
        Histogram {
            bounds: self.bounds.clone(),
            cumulative: self
                .cumulative
                .iter()
                .zip(&earlier.cumulative)
                .map(|(now, then)| now - then)
                .collect(),
        }
    }

    /// Adds another histogram with the same bounds (or adopts its bounds when empty).
    pub fn add(&mut self, other: &Histogram) {
        if self.bounds.is_empty() {
            *self = other.clone();
            return;
        }
        if self.bounds == other.bounds {
            for (a, b) in self.cumulative.iter_mut().zip(&other.cumulative) {
                *a += b;
            }
        }
    }
}

/// Splits `name{labels} value` into (name, labels, value).
fn parse_line(line: &str) -> Option<(&str, &str, f64)> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    match series.split_once('{') {
        Some((name, labels)) => Some((name, labels.trim_end_matches('}'), value)),
        None => Some((series, "", value)),
    }
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// Sum of a counter or gauge over its label sets, keeping those whose labels contain every
/// `key="value"` of `filter`.
pub fn sum(text: &str, name: &str, filter: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(parse_line)
        .filter(|(n, labels, _)| {
            *n == name && filter.iter().all(|(k, v)| label(labels, k) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// A histogram summed over its label sets; `None` if the text has no such histogram.
pub fn histogram(text: &str, name: &str) -> Option<Histogram> {
    let bucket = format!("{name}_bucket");
    let mut by_bound: Vec<(f64, f64)> = Vec::new();
    for (n, labels, value) in text.lines().filter_map(parse_line) {
        if n != bucket {
            continue;
        }
        let le = match label(labels, "le")? {
            "+Inf" => f64::INFINITY,
            le => le.parse().ok()?,
        };
        match by_bound.iter_mut().find(|(b, _)| *b == le) {
            Some((_, sum)) => *sum += value,
            None => by_bound.push((le, value)),
        }
    }
    if by_bound.is_empty() {
        return None;
    }
    by_bound.sort_by(|a, b| a.0.total_cmp(&b.0));
    Some(Histogram {
        bounds: by_bound.iter().map(|(b, _)| *b).collect(),
        cumulative: by_bound.iter().map(|(_, c)| *c).collect(),
    })
}

/// A counter followed across scrapes and restarts: the sum of its increases.
#[derive(Debug, Default, Clone)]
pub struct CounterTrack {
    last: Option<f64>,
    pub total: f64,
}

impl CounterTrack {
    /// Takes a new reading; returns the increase since the previous one.
    pub fn update(&mut self, now: f64) -> f64 {
        let delta = match self.last {
            Some(then) if now >= then => now - then,
            // Restarted: everything counted so far is new.
            Some(_) => now,
            None => now,
        };
        self.last = Some(now);
        self.total += delta;
        delta
    }
}

/// A histogram followed across scrapes and restarts.
#[derive(Debug, Default, Clone)]
pub struct HistogramTrack {
    last: Option<Histogram>,
    pub total: Histogram,
}

impl HistogramTrack {
    /// Takes a new scrape; returns what was observed since the previous one.
    pub fn update(&mut self, now: Histogram) -> Histogram {
        let delta = match &self.last {
            Some(then) => now.since(then),
            None => now.clone(),
        };
        self.total.add(&delta);
        self.last = Some(now);
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE x histogram\n\
        x_bucket{p=\"a\",le=\"0.1\"} 10\n\
        x_bucket{p=\"a\",le=\"0.5\"} 90\n\
        x_bucket{p=\"a\",le=\"+Inf\"} 100\n\
        x_bucket{p=\"b\",le=\"0.1\"} 0\n\
        x_bucket{p=\"b\",le=\"0.5\"} 0\n\
        x_bucket{p=\"b\",le=\"+Inf\"} 0\n\
        x_sum 12.5\n\
        x_count 100\n\
        c_total{outcome=\"accepted\",reason=\"\"} 7\n\
        c_total{outcome=\"rejected\",reason=\"x\"} 2\n";

    #[test]
    fn histograms_and_counters_are_summed_over_label_sets() {
        let h = histogram(TEXT, "x").unwrap();
        assert_eq!(h.bounds, vec![0.1, 0.5, f64::INFINITY]);
        assert_eq!(h.cumulative, vec![10.0, 90.0, 100.0]);
        // Rank 50 lies 40/80 of the way through (0.1, 0.5].
        assert!((h.quantile(0.5).unwrap() - 0.3).abs() < 1e-9);
        // Above the last finite bound: that bound.
        assert_eq!(h.quantile(0.99), Some(0.5));
        assert_eq!(sum(TEXT, "c_total", &[("outcome", "accepted")]), 7.0);
        assert_eq!(sum(TEXT, "c_total", &[]), 9.0);
        assert_eq!(histogram(TEXT, "y"), None);
    }

    #[test]
    fn tracks_survive_restarts() {
        let mut c = CounterTrack::default();
        assert_eq!(c.update(5.0), 5.0);
        assert_eq!(c.update(8.0), 3.0);
        assert_eq!(c.update(2.0), 2.0); // restarted
        assert_eq!(c.total, 10.0);
        let h = |a: f64, b: f64| Histogram {
            bounds: vec![1.0, f64::INFINITY],
            cumulative: vec![a, b],
        };
        let mut t = HistogramTrack::default();
        t.update(h(1.0, 2.0));
        assert_eq!(t.update(h(3.0, 5.0)), h(2.0, 3.0));
        assert_eq!(t.update(h(1.0, 1.0)), h(1.0, 1.0));
        assert_eq!(t.total, h(4.0, 6.0));
        assert_eq!(Histogram::default().quantile(0.5), None);
    }
}
