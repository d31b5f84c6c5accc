//! `redirector run`: install or adopt steering, serve the proxy, keep the
//! heartbeat that tells the programs the proxy is alive.
//!
//! Start-up order matters: the proxy binds before the first heartbeat, so the
//! programs never steer to a port nobody listens on; on shutdown the
//! heartbeat is cleared first, so new connects go direct at once.

use std::time::Duration;

use aya_log::EbpfLogger;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

use crate::{
    config::RunConfig,
    proxy::{self, Dialer, Proxy},
    steering::{self, Layout, Maps, OrigDstTable},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Steering(#[from] steering::Error),
    #[error(transparent)]
    Mounts(#[from] steering::fs::Error),
    #[error(transparent)]
    Proxy(#[from] proxy::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Why `run` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    Signal,
    /// The pins vanished: someone ran `redirector uninstall`.
    Uninstalled,
}

pub async fn run(config: RunConfig) -> Result<Exit, Error> {
    config.validate()?;
    let layout = Layout::new(&config.pin_dir);
    let cgroup_root = steering::fs::resolve_cgroup_root(config.cgroup_root.as_deref())?;
    let installed = steering::install(&layout, &cgroup_root, kernel_log_level())?;
    tokio::spawn(forward_kernel_logs(installed.log_program_id()));

    let mut maps = Maps::open(&layout)?;
    let targets: Vec<_> = config.targets.iter().map(|t| (*t, 0)).collect();
    maps.set_targets(&targets)?;

    let dialer = Dialer {
        socket_mark: config.socket_mark,
        connect_timeout: config.connect_timeout,
    };
    let proxy = Proxy::bind(&config.proxy_addrs, OrigDstTable::open(&layout)?, dialer)?;
    let listeners = proxy.local_addrs();
    let serving = tokio::spawn(proxy.serve());

    maps.set_proxy(&config.proxy_entry(steering::boottime_ns()))?;
    info!(
        listeners = ?listeners,
        cgroup = %installed.cgroup_root.display(),
        pins = %layout.pin_dir.display(),
        targets = ?config.targets.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "redirector ready"
    );

    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    let mut heartbeat = tokio::time::interval(config.heartbeat_interval());
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let exit = loop {
        tokio::select! {
            _ = sigterm.recv() => break Exit::Signal,
            _ = sigint.recv() => break Exit::Signal,
            _ = heartbeat.tick() => {
                if !layout.is_installed() {
                    warn!("pins removed (redirector uninstall): shutting down");
                    break Exit::Uninstalled;
                }
                if let Err(e) = maps.set_proxy(&config.proxy_entry(steering::boottime_ns())) {
                    warn!(error = %e, "heartbeat failed");
                }
            }
        }
    };

    if exit == Exit::Signal {
        // Connects go direct from now on instead of to a closing listener.
        if let Err(e) = maps.set_proxy(&config.proxy_entry(0)) {
            warn!(error = %e, "could not clear the heartbeat");
        }
    }
    serving.abort();
    info!(?exit, "redirector stopped");
    Ok(exit)
}

/// The eBPF log level is fixed when the programs load; follow the daemon's
/// own filter for the `redirector_ebpf` target. The programs only log at
/// debug, so by default they emit nothing.
fn kernel_log_level() -> aya_log::Level {
    if tracing::enabled!(target: "redirector_ebpf", tracing::Level::TRACE) {
        aya_log::Level::Trace
    } else if tracing::enabled!(target: "redirector_ebpf", tracing::Level::DEBUG) {
        aya_log::Level::Debug
    } else {
        aya_log::Level::Info
    }
}

/// Forwards aya-log records from the programs into tracing.
async fn forward_kernel_logs(program_id: u32) {
    let logger = match EbpfLogger::init_from_id(program_id) {
        Ok(logger) => logger,
        Err(e) => {
            warn!(error = %e, "eBPF logs unavailable");
            return;
        }
    };
    // SAFETY: the logger owns the ring buffer's fd for as long as it lives,
    // and the AsyncFd owns the logger.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(e) => {
            warn!(error = %e, "eBPF logs unavailable");
            return;
        }
    };
    loop {
        let Ok(mut ready) = logger.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
        // Bound the wake-up rate under a log flood.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
