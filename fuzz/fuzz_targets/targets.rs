//! The targets ConfigMap parser: whatever an operator writes under the
//! `targets` key gives directives or an error naming a line; never a
//! panic. Directives then resolve against the Services they name.
#![no_main]

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

use libfuzzer_sys::fuzz_target;
use redirector::{
    backend,
    k8s::targets::{self, Directive, ServiceInfo, ServiceKind},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let directives = match targets::parse(text) {
        Ok(directives) => directives,
        Err(e) => {
            let lines = text.lines().count();
            assert!(e.line >= 1 && e.line <= lines, "{e} of {lines} lines");
            return;
        }
    };
    // Every other Service exists, on the ports named, with a ClusterIP;
    // the rest are missing or headless: every branch of resolve is taken.
    let mut services = HashMap::new();
    for (i, directive) in directives.iter().enumerate() {
        let Directive::Service {
            service,
            port,
            kind,
        } = directive
        else {
            continue;
        };
        let mut named = vec![(service.clone(), *port)];
        if let Some(ServiceKind::Standalone { replicas }) = kind {
            named.extend(replicas.iter().cloned());
        }
        for (j, (service, port)) in named.into_iter().enumerate() {
            let info = services.entry(service).or_insert_with(ServiceInfo::default);
            match (i + j) % 3 {
                0 => {}
                1 => info.ports.push(port),
                _ => {
                    info.ports.push(port);
                    let n = u8::try_from((i + j) % 250).unwrap_or(0) + 1;
                    info.cluster_ips
                        .push(IpAddr::V4(Ipv4Addr::new(10, 96, 0, n)));
                }
            }
        }
    }
    let resolved = targets::resolve(&directives, &services);
    let _ = resolved.to_string();
    let _ = backend::validate_declared(&resolved.backends, false);
});
