//! The `redirector-cni` CNI plugin (placeholder until the plugin lands).

fn main() -> std::process::ExitCode {
    std::process::ExitCode::FAILURE
}
