//! Reading Prometheus metrics from a server started by a test.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// The metrics address a server logged at start.
pub fn metrics_addr(log: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(at) = text.find("serving Prometheus metrics on http://") {
            let rest = &text[at + "serving Prometheus metrics on http://".len()..];
            return rest.split("/metrics").next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "{} logged no metrics address", log.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One scrape: the body of `GET /metrics`.
pub fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    body.to_string()
}

/// The value of the series whose name and labels are exactly `series`.
pub fn value(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).map(|v| v.parse().unwrap()))
}
