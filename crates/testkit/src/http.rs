//! HTTP/1.1 GETs to a service's operations endpoint on 127.0.0.1, with
//! hyper's client.

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// GET `path`; returns the status code and the body.
pub async fn get(port: u16, path: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// GET `path` once the listener accepts connections.
pub async fn get_when_up(port: u16, path: &str) -> (u16, String) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return get(port, path).await;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the endpoint on port {port} never came up");
}
