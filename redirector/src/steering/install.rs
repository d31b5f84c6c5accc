//! Loading, attaching, adopting and removing the kernel programs.
//!
//! Install is idempotent and restart-safe: a program whose pinned link is
//! already attached to the requested cgroup with the same instructions (same
//! kernel tag) is adopted as is, so a daemon restart never detaches anything
//! and `bpftool prog list` keeps exactly one set. A program whose code or
//! cgroup changed is attached anew first and then swapped in by renaming its
//! pin over the old one, which detaches the old link: steering never has a gap.
//!
//! The daemon keeps no program or link file descriptors: the pins own the
//! attachment, so removing the pins (`uninstall`) is all it takes to detach.
//!
//! Maps of another layout version (an upgrade across an ABI change) are
//! never refused: the new set is created beside them, enrollments and
//! targets are copied over while the old programs still steer, the new
//! programs are swapped in, and then the old set's pins are removed.

use std::{
    fs::{self, File},
    io,
    os::{
        fd::{AsFd, AsRawFd as _},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapInfo},
    programs::{CgroupAttachMode, Program, ProgramFd, links::FdLink, loaded_programs},
};
use redirector_ebpf::{
    Counters, Enrollment, MAX_ENROLLED, MAX_LISTENERS, MAX_ORIG_DST, MAX_TARGETS, NetnsKey,
    OrigDst, PORT_WORDS, ProxyConfig, SockTuple, Target, TargetKey, map_names, port_bitmap,
    program_names,
};

use super::{Error, Layout, fs as kfs, sys};

/// The eBPF object built from `redirector-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector-ebpf"));

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramOutcome {
    /// Newly attached.
    Attached,
    /// Already attached with the same code: kept.
    Adopted,
    /// Attached with different code or to another cgroup: swapped.
    Replaced,
}

#[derive(Debug)]
pub struct Installed {
    pub cgroup_root: PathBuf,
    /// (program, outcome, kernel program id), in `program_names::ALL` order.
    pub programs: Vec<(&'static str, ProgramOutcome, u32)>,
    /// For the proxy's listeners; `None` where the kernel refused it (the
    /// queued connections of an upgrade's old listener are then reset).
    pub reuseport: Option<ReuseportProgram>,
}

/// `redir_reuseport`, loaded in this process (not pinned: a reuseport group
/// keeps its own reference to the program while any of its sockets lives).
#[derive(Debug)]
pub struct ReuseportProgram(ProgramFd);

impl ReuseportProgram {
    /// Attaches the program to `listener`'s `SO_REUSEPORT` group (every
    /// listener of the same address, this daemon's and another's).
    pub fn attach(&self, listener: &impl AsFd) -> io::Result<()> {
        nix::sys::socket::setsockopt(listener, AttachReuseportEbpf, &self.0.as_fd().as_raw_fd())
            .map_err(io::Error::from)
    }
}

/// `SO_ATTACH_REUSEPORT_EBPF`, which nix does not name.
#[derive(Clone, Copy, Debug)]
struct AttachReuseportEbpf;

impl nix::sys::socket::SetSockOpt for AttachReuseportEbpf {
    type Val = std::os::fd::RawFd;

    fn set<F: AsFd>(&self, fd: &F, program: &Self::Val) -> nix::Result<()> {
        // SAFETY: the option value is a c_int (the program fd) of that size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_REUSEPORT_EBPF,
                std::ptr::from_ref(program).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        nix::errno::Errno::result(rc).map(drop)
    }
}

impl Installed {
    /// A program id whose maps include aya-log's ring buffer.
    pub fn log_program_id(&self) -> u32 {
        self.programs[0].2
    }

    /// (attach type, program id) of the connect4/connect6 programs.
    pub fn connect_program_ids(&self) -> Vec<(u32, u32)> {
        self.programs
            .iter()
            .filter_map(|(name, _, id)| match *name {
                program_names::CONNECT4 => Some((sys::ATTACH_INET4_CONNECT, *id)),
                program_names::CONNECT6 => Some((sys::ATTACH_INET6_CONNECT, *id)),
                _ => None,
            })
            .collect()
    }
}

/// Installs or adopts the programs and maps.
pub fn install(
    layout: &Layout,
    cgroup_root: &Path,
    kernel_log_level: aya_log::Level,
) -> Result<Installed, Error> {
    kfs::ensure_bpffs(&layout.pin_dir)?;
    for dir in [layout.links_dir(), layout.maps_dir()] {
        fs::create_dir_all(&dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
    }
    check_pinned_maps(layout)?;
    let old_sets = layout.other_map_sets();

    let cgroup = File::open(cgroup_root).map_err(Error::io(format!(
        "cannot open cgroup {}",
        cgroup_root.display()
    )))?;
    let cgroup_id = cgroup
        .metadata()
        .map_err(Error::io(format!("cannot stat {}", cgroup_root.display())))?
        .ino();

    let mut loader = EbpfLoader::new();
    let map_paths: Vec<(&str, PathBuf)> = map_names::ALL
        .iter()
        .map(|name| (*name, layout.map(name)))
        .collect();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let level = kernel_log_level as u8;
    loader.override_global(aya_log::LEVEL, &level, true);
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    // While the old programs still steer, carry their state over, so the
    // swap below changes nothing for enrolled pods.
    for (version, dir) in &old_sets {
        carry_over(layout, dir).map_err(Error::io(format!(
            "cannot copy enrollments and targets from map layout v{version} ({})",
            dir.display()
        )))?;
    }
    let own_maps = pinned_map_ids(layout);

    let mut programs = Vec::with_capacity(program_names::ALL.len());
    for name in program_names::ALL {
        let (outcome, id) =
            install_program(&mut ebpf, name, layout, &cgroup, cgroup_id, &own_maps)?;
        tracing::info!(program = name, id, ?outcome, cgroup = %cgroup_root.display(), "program");
        programs.push((name, outcome, id));
    }
    remove_stale_links(layout)?;
    let reuseport = load_reuseport(&mut ebpf)
        .inspect_err(|e| {
            tracing::warn!(
                error = %e,
                "cannot load the listeners' SO_REUSEPORT program (kernel before 5.14?): \
                 during an upgrade, connections queued on the old proxy's listener are reset"
            );
        })
        .ok();
    for (version, dir) in &old_sets {
        let removed = remove_map_set(dir)?;
        tracing::info!(
            version,
            dir = %dir.display(),
            removed,
            "removed the map pins of an older layout"
        );
    }
    Ok(Installed {
        cgroup_root: cgroup_root.into(),
        programs,
        reuseport,
    })
}

fn load_reuseport(ebpf: &mut Ebpf) -> Result<ReuseportProgram, Error> {
    let name = program_names::REUSEPORT;
    let program_err = |source| Error::Program {
        program: name,
        source,
    };
    let Some(Program::SkReuseport(program)) = ebpf.program_mut(name) else {
        return Err(Error::MissingProgram { program: name });
    };
    program.load().map_err(program_err)?;
    let fd = program.fd().map_err(program_err)?;
    let fd = fd
        .try_clone()
        .map_err(Error::io(format!("cannot duplicate the fd of {name}")))?;
    Ok(ReuseportProgram(fd))
}

fn install_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    layout: &Layout,
    cgroup: &File,
    cgroup_id: u64,
    own_maps: &[u32],
) -> Result<(ProgramOutcome, u32), Error> {
    let program_err = |source| Error::Program {
        program: name,
        source,
    };
    let link_path = layout.link(name);
    let existing = match sys::open_pinned(&link_path) {
        Ok(fd) => Some(
            sys::cgroup_link_info(&fd)
                .map_err(Error::io(format!("cannot query {}", link_path.display())))?,
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(format!("cannot open {}", link_path.display()))(e)),
    };

    let program = ebpf
        .program_mut(name)
        .ok_or(Error::MissingProgram { program: name })?;
    match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        _ => return Err(Error::MissingProgram { program: name }),
    }
    .map_err(program_err)?;
    let tag = program.info().map_err(program_err)?.tag();

    if let Some(existing) = existing {
        let same_cgroup = existing.cgroup_id == Some(cgroup_id);
        // A program's tag ignores which maps it uses: the same code bound to
        // another layout's maps is not ours to adopt. (Its unpinned maps,
        // such as .rodata, are its own either way.)
        if same_cgroup
            && let Some((old_tag, old_maps)) = program_tag_and_maps(existing.prog_id)
            && old_tag == tag
            && old_maps
                .iter()
                .all(|id| own_maps.contains(id) || !is_pinned_kind(*id))
        {
            return Ok((ProgramOutcome::Adopted, existing.prog_id));
        }
    }

    // bpf_link attachments are always multi-program (the kernel attaches them
    // with BPF_F_ALLOW_MULTI and rejects explicit flags), so "Single" here
    // still shares the cgroup with other tools' programs.
    let link: FdLink = match program {
        Program::CgroupSockAddr(p) => {
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_err)?;
            let link = p.take_link(id).map_err(program_err)?;
            FdLink::try_from(link)
        }
        Program::SockOps(p) => {
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_err)?;
            let link = p.take_link(id).map_err(program_err)?;
            FdLink::try_from(link)
        }
        _ => return Err(Error::MissingProgram { program: name }),
    }
    .map_err(|source| Error::Link {
        program: name,
        source,
    })?;

    // Pin under a temporary name, then rename over the old pin: the new
    // program is attached before the old one goes. (bpffs forbids dots.)
    let staging = layout.link(&format!("{name}_staging"));
    let _ = fs::remove_file(&staging);
    let pinned = link.pin(&staging).map_err(|source| Error::PinLink {
        program: name,
        path: staging.clone(),
        source,
    })?;
    fs::rename(&staging, &link_path).map_err(Error::io(format!(
        "cannot move pin to {}",
        link_path.display()
    )))?;
    drop(pinned);

    let id = program.info().map_err(program_err)?.id();
    let outcome = if existing.is_some() {
        ProgramOutcome::Replaced
    } else {
        ProgramOutcome::Attached
    };
    Ok((outcome, id))
}

fn program_tag_and_maps(id: u32) -> Option<(u64, Vec<u32>)> {
    let info = loaded_programs()
        .filter_map(Result::ok)
        .find(|info| info.id() == id)?;
    let maps = info.map_ids().ok().flatten().unwrap_or_default();
    Some((info.tag(), maps))
}

/// Whether map `id` is one of the kinds redirector pins (by its name).
fn is_pinned_kind(id: u32) -> bool {
    MapInfo::from_id(id)
        .ok()
        .and_then(|info| info.name_as_str().map(|n| map_names::ALL.contains(&n)))
        .unwrap_or(false)
}

/// Kernel ids of the maps pinned for this build's layout.
fn pinned_map_ids(layout: &Layout) -> Vec<u32> {
    map_names::ALL
        .iter()
        .filter_map(|name| MapInfo::from_pin(layout.map(name)).ok())
        .map(|info| info.id())
        .collect()
}

/// Copies enrollments and targets from an older layout's maps into this
/// build's, where their key and value layouts are the same (they have not
/// changed since v1); anything else starts empty and is refilled by the
/// daemon and the node agent.
fn carry_over(layout: &Layout, old_dir: &Path) -> io::Result<()> {
    fn copy<K: aya::Pod, V: aya::Pod>(from: &Path, to: &Path) -> io::Result<usize> {
        let open = |path: &Path| -> io::Result<HashMap<MapData, K, V>> {
            let data = MapData::from_pin(path).map_err(io::Error::other)?;
            HashMap::try_from(Map::HashMap(data)).map_err(io::Error::other)
        };
        if !from.exists() {
            return Ok(0);
        }
        let info = MapInfo::from_pin(from).map_err(io::Error::other)?;
        if (info.key_size() as usize, info.value_size() as usize)
            != (std::mem::size_of::<K>(), std::mem::size_of::<V>())
        {
            return Ok(0);
        }
        let old = open(from)?;
        let mut new = open(to)?;
        let mut copied = 0;
        for entry in old.iter() {
            let (key, value) = entry.map_err(io::Error::other)?;
            new.insert(key, value, 0).map_err(io::Error::other)?;
            copied += 1;
        }
        Ok(copied)
    }
    let enrolled = copy::<NetnsKey, Enrollment>(
        &old_dir.join(map_names::ENROLLED),
        &layout.map(map_names::ENROLLED),
    )?;
    let targets = copy::<TargetKey, Target>(
        &old_dir.join(map_names::TARGETS),
        &layout.map(map_names::TARGETS),
    )?;
    fill_redis_ports(layout)?;
    tracing::info!(from = %old_dir.display(), enrolled, targets, "carried over from an older map layout");
    Ok(())
}

/// Sets the port bitmap's bits for the targets in this layout's target map,
/// before the new programs (which read the bitmap first) replace the old.
fn fill_redis_ports(layout: &Layout) -> io::Result<()> {
    let targets: HashMap<MapData, TargetKey, Target> = HashMap::try_from(Map::HashMap(
        MapData::from_pin(layout.map(map_names::TARGETS)).map_err(io::Error::other)?,
    ))
    .map_err(io::Error::other)?;
    let mut ports: Array<MapData, u64> = Array::try_from(Map::Array(
        MapData::from_pin(layout.map(map_names::REDIS_PORTS)).map_err(io::Error::other)?,
    ))
    .map_err(io::Error::other)?;
    let keys = targets
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .map_err(io::Error::other)?;
    let words = port_bitmap(keys.iter().map(|key| key.port));
    for (index, word) in (0u32..).zip(words) {
        if word != 0 {
            ports.set(index, word, 0).map_err(io::Error::other)?;
        }
    }
    Ok(())
}

/// Removes the map pins of another layout version (and its directory, when
/// it is one of its own); returns how many pins went.
fn remove_map_set(dir: &Path) -> Result<usize, Error> {
    let mut removed = 0;
    for name in map_names::ALL {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("cannot remove {}", path.display()))(e)),
        }
    }
    if dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("maps-v"))
    {
        match fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("cannot remove {}", dir.display()))(e)),
        }
    }
    Ok(removed)
}

/// Link pins of programs this build no longer has.
fn remove_stale_links(layout: &Layout) -> Result<(), Error> {
    let dir = layout.links_dir();
    let entries =
        fs::read_dir(&dir).map_err(Error::io(format!("cannot list {}", dir.display())))?;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        if !program_names::ALL.iter().any(|p| name == *p) {
            tracing::info!(pin = %entry.path().display(), "removing stale link");
            fs::remove_file(entry.path()).map_err(Error::io(format!(
                "cannot remove {}",
                entry.path().display()
            )))?;
        }
    }
    Ok(())
}

/// Refuses to reuse pinned maps whose layout differs from this build's: the
/// kernel would accept them and the programs would misread every entry.
fn check_pinned_maps(layout: &Layout) -> Result<(), Error> {
    use std::mem::size_of;
    let expected: [(&str, usize, usize, u32); 8] = [
        (
            map_names::ENROLLED,
            size_of::<NetnsKey>(),
            size_of::<Enrollment>(),
            MAX_ENROLLED,
        ),
        (
            map_names::TARGETS,
            size_of::<TargetKey>(),
            size_of::<Target>(),
            MAX_TARGETS,
        ),
        (map_names::REDIS_PORTS, 4, size_of::<u64>(), PORT_WORDS),
        (map_names::PROXY, 4, size_of::<ProxyConfig>(), 1),
        // Socket storage: keyed by a socket fd, no capacity.
        (map_names::PENDING, 4, size_of::<OrigDst>(), 0),
        (
            map_names::ORIG_DST,
            size_of::<SockTuple>(),
            size_of::<OrigDst>(),
            MAX_ORIG_DST,
        ),
        (map_names::COUNTERS, 4, size_of::<Counters>(), 1),
        (map_names::LISTENER, 4, 4, MAX_LISTENERS),
    ];
    for (name, key_size, value_size, max_entries) in expected {
        let path = layout.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| Error::OpenMap {
            path: path.clone(),
            source,
        })?;
        let found = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (key_size, value_size, max_entries) {
            return Err(Error::IncompatibleMap {
                path,
                detail: format!(
                    "key/value/max_entries {found:?}, expected {:?}",
                    (key_size, value_size, max_entries)
                ),
            });
        }
    }
    Ok(())
}

/// What `uninstall` removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
}

/// Detaches every program (by removing its link pin: the daemon holds no
/// link fds) and removes every map pin, of every layout version, and the pin
/// directory. Idempotent.
pub fn uninstall(layout: &Layout) -> Result<Removed, Error> {
    let mut removed = Removed::default();
    let links_dir = layout.links_dir();
    if let Ok(entries) = fs::read_dir(&links_dir) {
        for entry in entries.filter_map(Result::ok) {
            fs::remove_file(entry.path()).map_err(Error::io(format!(
                "cannot remove {}",
                entry.path().display()
            )))?;
            removed.links += 1;
        }
        fs::remove_dir(&links_dir)
            .map_err(Error::io(format!("cannot remove {}", links_dir.display())))?;
    }
    let mut sets = layout.other_map_sets();
    sets.push((redirector_ebpf::ABI_VERSION, layout.maps_dir()));
    for (_, dir) in sets {
        removed.maps += remove_map_set(&dir)?;
    }
    match fs::remove_dir(&layout.pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::io(format!(
                "cannot remove {} (does it hold pins that are not redirector's?)",
                layout.pin_dir.display()
            ))(e));
        }
    }
    Ok(removed)
}
