//! A plain HTTP/1.1 GET (one per connection, as the kubelet's probes send
//! it), from inside a network namespace: enough for the admin endpoint.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::process::Place;

/// Connects from inside `place`'s network namespace, with a read timeout.
pub fn connect_in(place: &Place, to: SocketAddr) -> io::Result<TcpStream> {
    let stream = place.connect(to, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// The whole response (status line, headers and body) to `GET path`.
pub fn get_in(place: &Place, to: SocketAddr, path: &str) -> String {
    let mut stream =
        connect_in(place, to).unwrap_or_else(|e| panic!("connect to {to} for GET {path}: {e}"));
    // HTTP/1.1: hyper answers an HTTP/1.0 request in HTTP/1.0.
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("GET {path} from {to}: {e}"));
    response
}

/// The value of one sample (`name{labels}` exactly as exported), 0 when absent.
pub fn sample(metrics: &str, name: &str) -> f64 {
    // `name{a="1"}` matches every series of `name` carrying those labels
    // (and others, such as `backend`), summed: a daemon with one backend
    // reads as before.
    let (wanted_name, wanted_labels) = split_sample(name);
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (key_name, labels) = split_sample(key);
            (key_name == wanted_name && wanted_labels.iter().all(|w| labels.contains(w)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// `name{a="1",b="2"}` into the name and its `a="1"` pairs.
fn split_sample(sample: &str) -> (&str, Vec<&str>) {
    match sample.split_once('{') {
        Some((name, rest)) => (
            name,
            rest.trim_end_matches('}')
                .split(',')
                .filter(|p| !p.is_empty())
                .collect(),
        ),
        None => (sample, Vec::new()),
    }
}
