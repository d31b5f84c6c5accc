//! What the admin port answers, decided from the request line, the one
//! header that matters and the daemon's state: no sockets here, the server
//! in `admin` carries the decision out.

use super::Scope;

/// What a request asks, as far as the answer depends on it.
#[derive(Clone, Copy, Debug)]
pub struct Asked<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The scraper accepts OpenMetrics (Prometheus does).
    pub openmetrics: bool,
    /// The peer is this host (a preStop hook), not the network.
    pub from_loopback: bool,
}

/// The daemon's state the probes report.
#[derive(Clone, Copy, Debug, Default)]
pub struct State {
    pub ready: bool,
    pub draining: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Metrics {
        openmetrics: bool,
    },
    /// Anything but `/metrics` on a metrics-only listener.
    MetricsOnly,
    Status,
    Dashboard,
    Ready,
    NotReady {
        draining: bool,
    },
    Live,
    Drain,
    /// `POST /drain` from another host.
    DrainForbidden,
    NotFound,
    MethodNotAllowed,
}

/// Where a request goes on a listener of `scope`.
pub fn route(asked: &Asked<'_>, scope: Scope, state: State) -> Route {
    match (asked.method, asked.path) {
        ("GET", "/metrics") => Route::Metrics {
            openmetrics: asked.openmetrics,
        },
        _ if scope == Scope::MetricsOnly => Route::MetricsOnly,
        ("GET", "/status") => Route::Status,
        ("GET", "/dashboard" | "/dashboard/") => Route::Dashboard,
        ("GET", "/healthz/ready") if state.ready && !state.draining => Route::Ready,
        ("GET", "/healthz/ready") => Route::NotReady {
            draining: state.draining,
        },
        ("GET", "/healthz/live") => Route::Live,
        ("POST", "/drain") if asked.from_loopback => Route::Drain,
        ("POST", "/drain") => Route::DrainForbidden,
        ("GET", _) => Route::NotFound,
        _ => Route::MethodNotAllowed,
    }
}

/// Whether an `Accept` header value asks for OpenMetrics.
pub fn accepts_openmetrics(accept: &str) -> bool {
    accept.contains("application/openmetrics-text")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(method: &'static str, path: &'static str) -> Asked<'static> {
        Asked {
            method,
            path,
            openmetrics: false,
            from_loopback: true,
        }
    }

    const READY: State = State {
        ready: true,
        draining: false,
    };

    #[test]
    fn metrics_are_served_in_the_format_the_scraper_accepts() {
        let mut prometheus = asked("GET", "/metrics");
        prometheus.openmetrics =
            accepts_openmetrics("application/openmetrics-text;version=1.0.0,text/plain;q=0.5");
        assert_eq!(
            route(&prometheus, Scope::Full, READY),
            Route::Metrics { openmetrics: true }
        );
        assert_eq!(
            route(&asked("GET", "/metrics"), Scope::MetricsOnly, READY),
            Route::Metrics { openmetrics: false }
        );
    }

    #[test]
    fn a_metrics_only_listener_serves_nothing_else() {
        for (method, path) in [
            ("GET", "/status"),
            ("GET", "/healthz/live"),
            ("POST", "/drain"),
            ("GET", "/dashboard"),
        ] {
            assert_eq!(
                route(&asked(method, path), Scope::MetricsOnly, READY),
                Route::MetricsOnly,
                "{method} {path}"
            );
        }
    }

    #[test]
    fn readiness_fails_while_installing_and_once_draining() {
        let probe = asked("GET", "/healthz/ready");
        assert_eq!(route(&probe, Scope::Full, READY), Route::Ready);
        assert_eq!(
            route(&probe, Scope::Full, State::default()),
            Route::NotReady { draining: false }
        );
        let draining = State {
            ready: true,
            draining: true,
        };
        assert_eq!(
            route(&probe, Scope::Full, draining),
            Route::NotReady { draining: true }
        );
        assert_eq!(
            route(&asked("GET", "/healthz/live"), Scope::Full, draining),
            Route::Live
        );
    }

    #[test]
    fn only_this_host_may_drain() {
        let mut drain = asked("POST", "/drain");
        assert_eq!(route(&drain, Scope::Full, READY), Route::Drain);
        drain.from_loopback = false;
        assert_eq!(route(&drain, Scope::Full, READY), Route::DrainForbidden);
        assert_eq!(
            route(&asked("GET", "/drain"), Scope::Full, READY),
            Route::NotFound
        );
        assert_eq!(
            route(&asked("DELETE", "/metrics"), Scope::Full, READY),
            Route::MethodNotAllowed
        );
    }
}
