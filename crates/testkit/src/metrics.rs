//! Reading a Prometheus text exposition (what a scraper sees), with the
//! `prometheus-parse` crate: enough to sum series by label.

use prometheus_parse::{Scrape, Value};

/// The samples of one scrape.
pub struct Samples(Scrape);

impl Samples {
    /// Parses the text exposition format.
    pub fn parse(text: &str) -> Samples {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        Samples(Scrape::parse(lines).expect("a Prometheus text exposition"))
    }

    /// The sum of the counter, gauge or untyped series of `name` whose labels
    /// include `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| filter.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }
}
