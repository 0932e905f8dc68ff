//! Reading the service's Prometheus metrics: a plain HTTP/1.0 GET of the
//! served endpoint (what a scraper sees) and a small parser of the text
//! format, enough to sum series by label.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample line: `name{label="value",…} number`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn matches(&self, name: &str, filter: &[(&str, &str)]) -> bool {
        self.name == name && filter.iter().all(|(k, v)| self.label(k) == Some(v))
    }
}

/// The samples of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples(pub Vec<Sample>);

impl Samples {
    /// Parses the text exposition format; comments and malformed lines are skipped.
    pub fn parse(text: &str) -> Samples {
        Samples(text.lines().filter_map(parse_line).collect())
    }

    /// The sum of the series of `name` whose labels include `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|s| s.matches(name, filter))
            .map(|s| s.value)
            .sum()
    }

    /// The series of `name` whose labels include `filter`.
    pub fn series<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| s.matches(name, filter))
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, rest) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, rest)
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, Vec::new(), rest)
        }
    };
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"} rest`, unescaping values; returns the labels and
/// what follows the closing brace.
fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after_key) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after_key.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        rest = &after_key[end + 1..];
    }
}

/// `GET path` on `addr`; returns the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        // HTTP/1.0: the server closes after the response, no chunking.
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 5s"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response")
        })?;
    Ok((status, body.to_owned()))
}

/// Scrapes `/metrics` at `addr`.
pub async fn scrape(addr: SocketAddr) -> std::io::Result<Samples> {
    let (status, body) = get(addr, "/metrics").await?;
    if status != 200 {
        return Err(std::io::Error::other(format!("/metrics answered {status}")));
    }
    Ok(Samples::parse(&body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_and_sum_by_label() {
        let text = "# HELP x y\n# TYPE jobs counter\n\
            jobs{virtual_storage=\"default\",outcome=\"completed\"} 3\n\
            jobs{virtual_storage=\"default\",outcome=\"failed\"} 1\n\
            jobs{virtual_storage=\"other\",outcome=\"completed\"} 5\n\
            odd{v=\"a\\\"b,}c\"} 2.5 1700000000\n\
            plain 7\n\
            garbage\n";
        let s = Samples::parse(text);
        assert_eq!(s.0.len(), 5);
        assert_eq!(s.sum("jobs", &[("virtual_storage", "default")]), 4.0);
        assert_eq!(s.sum("jobs", &[("outcome", "completed")]), 8.0);
        assert_eq!(s.sum("plain", &[]), 7.0);
        let odd = s.series("odd", &[]).next().unwrap();
        assert_eq!(odd.label("v"), Some("a\"b,}c"));
        assert_eq!(odd.value, 2.5);
    }
}
