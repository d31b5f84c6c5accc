//! Builds `redirector-ebpf`'s programs for bpfel-unknown-none with nightly and
//! bpf-linker (both installed by `cargo xtask setup`), keeping BTF so bpftool
//! can show map fields by name. The object is embedded into the daemon.

fn main() -> anyhow::Result<()> {
    // aya-build relays every line the nested cargo prints as a build warning;
    // keep it to real diagnostics.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    // The workspace's release profile links the daemon with whole-program
    // LTO; the programs are one crate built as a unit already, and the
    // kernel's verifier has passed them as they are built without it.
    // SAFETY: as above.
    unsafe { std::env::set_var("CARGO_PROFILE_RELEASE_LTO", "false") };
    let ebpf = aya_build::Package {
        name: "redirector-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../redirector-ebpf"),
        no_default_features: true,
        features: &["programs"],
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
