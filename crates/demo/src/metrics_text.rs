//! Reading the service's Prometheus metrics: an HTTP GET of the served
//! endpoint with hyper's client (what a scraper sees), and the text format
//! parsed by `prometheus-parse`, enough to sum series by label.
//!
//! `prometheus-parse` splits labels on `,` and `=` and does not unescape
//! their values; the labels the demo filters on (virtual storage, storage,
//! change type, outcome) never hold those characters.

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_parse::{Scrape, Value};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

/// How long a GET may take, connecting and reading the body included.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The samples of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples(Vec<prometheus_parse::Sample>);

impl Samples {
    /// Parses the text exposition format; comments and malformed lines are
    /// skipped. A histogram's or summary's `_count` and `_sum` are plain
    /// samples of those names.
    pub fn parse(text: &str) -> Samples {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        // Only a failing line reader makes parse fail, and these lines are all Ok.
        Samples(Scrape::parse(lines).map(|s| s.samples).unwrap_or_default())
    }

    /// The sum of the counter, gauge or untyped series of `name` whose labels
    /// include `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| filter.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                Value::Histogram(_) | Value::Summary(_) => 0.0,
            })
            .sum()
    }
}

/// `GET path` on `addr`; returns the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    get_within(addr, path, ANSWER_WITHIN).await
}

async fn get_within(addr: SocketAddr, path: &str, within: Duration) -> io::Result<(u16, String)> {
    tokio::time::timeout(within, exchange(addr, path))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {within:?}"),
            )
        })?
}

async fn exchange(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    // Aborted when the exchange ends or times out, so a server that never
    // answers leaves no task behind.
    let _connection = AbortOnDropHandle::new(tokio::spawn(connection));
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(io::Error::other)?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(io::Error::other)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Scrapes `/metrics` at `addr`.
pub async fn scrape(addr: SocketAddr) -> io::Result<Samples> {
    let (status, body) = get(addr, "/metrics").await?;
    if status != 200 {
        return Err(io::Error::other(format!("/metrics answered {status}")));
    }
    Ok(Samples::parse(&body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A peer on 127.0.0.1 that writes `answer` to its first connection
    /// (nothing at all when `None`) and then holds it open.
    async fn peer(answer: Option<&'static [u8]>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            if let Some(answer) = answer {
                stream.write_all(answer).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_get_returns_status_and_body_and_fails_on_silence_or_garbage() {
        let ok = peer(Some(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 8\r\n\r\nnot yet\n",
        ))
        .await;
        let answer = get_within(ok, "/health/ready", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(answer, (503, "not yet\n".to_owned()));

        let silent = peer(None).await;
        let err = get_within(silent, "/metrics", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), "no answer within 200ms");

        let garbage = peer(Some(b"hello\r\n\r\n")).await;
        assert!(
            get_within(garbage, "/metrics", Duration::from_secs(5))
                .await
                .is_err()
        );
    }

    #[test]
    fn samples_parse_and_sum_by_label() {
        let text = "# HELP x y\n# TYPE jobs counter\n\
            jobs{virtual_storage=\"default\",outcome=\"completed\"} 3\n\
            jobs{virtual_storage=\"default\",outcome=\"failed\"} 1\n\
            jobs{virtual_storage=\"other\",outcome=\"completed\"} 5 1700000000\n\
            # TYPE latency histogram\n\
            latency_bucket{type=\"update\",le=\"0.1\"} 2\n\
            latency_bucket{type=\"update\",le=\"+Inf\"} 3\n\
            latency_sum{type=\"update\"} 0.25\n\
            latency_count{type=\"update\"} 3\n\
            plain 7\n\
            garbage\n";
        let s = Samples::parse(text);
        assert_eq!(s.sum("jobs", &[("virtual_storage", "default")]), 4.0);
        assert_eq!(s.sum("jobs", &[("outcome", "completed")]), 8.0);
        assert_eq!(s.sum("latency_count", &[]), 3.0);
        assert_eq!(s.sum("latency_sum", &[("type", "update")]), 0.25);
        assert_eq!(s.sum("latency", &[]), 0.0, "buckets are not summed");
        assert_eq!(s.sum("plain", &[]), 7.0);
        assert_eq!(s.sum("garbage", &[]), 0.0);
    }
}
