//! The one `bpf(2)` query aya 0.14 does not expose: which cgroup a pinned
//! link is attached to (`bpf_link_info.cgroup`). It decides whether a pinned
//! link can be adopted as is, and `status` shows it.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// What the kernel reports about a pinned cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// `None` when the link is not a cgroup link (not ours, or foreign).
    pub cgroup_id: Option<u64>,
    pub attach_type: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, correctly sized `bpf_attr` prefix; the
    // kernel treats the bytes it does not know as zero.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Opens a pinned BPF object.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads `bpf_link_info` of a link.
pub fn cgroup_link_info(link: &OwnedFd) -> io::Result<CgroupLinkInfo> {
    // struct bpf_link_info { u32 type, id, prog_id; union (8-aligned, at 16) {
    // struct { u64 cgroup_id; u32 attach_type; } cgroup; ... } }. The buffer is
    // larger than the kernel's struct; the kernel fills what it knows.
    let mut info = [0u64; 16];
    let mut attr = InfoByFdAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let link_type = info[0] as u32;
    let link_id = (info[0] >> 32) as u32;
    let prog_id = info[1] as u32;
    let is_cgroup = link_type == BPF_LINK_TYPE_CGROUP;
    Ok(CgroupLinkInfo {
        link_id,
        prog_id,
        cgroup_id: is_cgroup.then_some(info[2]),
        attach_type: if is_cgroup { info[3] as u32 } else { 0 },
    })
}

/// `enum bpf_attach_type` names of the hooks redirector uses.
pub fn attach_type_name(attach_type: u32) -> &'static str {
    match attach_type {
        3 => "sock_ops",
        10 => "cgroup_inet4_connect",
        11 => "cgroup_inet6_connect",
        _ => "other",
    }
}

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_F_QUERY_EFFECTIVE: u32 = 1;
/// `enum bpf_attach_type` values of the connect hooks.
pub const ATTACH_INET4_CONNECT: u32 = 10;
pub const ATTACH_INET6_CONNECT: u32 = 11;

/// `union bpf_attr` for BPF_PROG_QUERY (the fields up to `prog_cnt`).
#[repr(C)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// Ids of the programs that run for `attach_type` on sockets of `cgroup`,
/// in the order the kernel runs them (its effective array: the cgroup's own
/// programs in attach order, then its ancestors').
pub fn effective_programs(cgroup: &std::fs::File, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = ProgQueryAttr {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_type,
            query_flags: BPF_F_QUERY_EFFECTIVE,
            attach_flags: 0,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            _pad: 0,
        };
        match bpf(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {
                ids.truncate(attr.prog_cnt as usize);
                return Ok(ids);
            }
            // The kernel says how many there are: ask again with room.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                ids = vec![0u32; attr.prog_cnt as usize + 8];
            }
            Err(e) => return Err(e),
        }
    }
}
