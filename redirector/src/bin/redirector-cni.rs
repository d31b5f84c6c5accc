//! `redirector-cni`: the CNI plugin the container runtime runs, chained
//! last, on pod sandbox ADD/DEL (see `redirector::cni::plugin`).

fn main() -> std::process::ExitCode {
    redirector::cni::plugin::main()
}
