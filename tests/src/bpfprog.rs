//! Other tools' eBPF programs, as a node has them: tiny programs loaded
//! with raw `bpf(2)` and attached to a cgroup next to redirector's, to check
//! that redirector leaves them working (a CNI's `sock_ops` tuning) and
//! notices them (a socket load balancer's `connect4` ahead of ours). The
//! link is not pinned: dropping the guard detaches the program.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
/// `enum bpf_sock_ops_op` value of the initial receive window callback.
const BPF_SOCK_OPS_RWND_INIT: i32 = 2;

/// One `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// The few opcodes used here (BPF_CLASS | BPF_SIZE/OP | BPF_SRC).
const LDX_W: u8 = 0x61; // r_dst = *(u32 *)(r_src + off)
const STX_W: u8 = 0x63; // *(u32 *)(r_dst + off) = r_src
const MOV64_K: u8 = 0xb7; // r_dst = imm
const JNE_K: u8 = 0x55; // if r_dst != imm goto +off
const EXIT: u8 = 0x95;

/// A program attached to a cgroup until dropped.
pub struct Attached {
    name: String,
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl Attached {
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A `sock_ops` program that answers `BPF_SOCK_OPS_RWND_INIT` with
/// `segments`: the initial receive window a connecting socket advertises in
/// its SYN becomes `segments` × MSS. A tuning agent's program, in short. It
/// returns 1, as a program must for its reply to stand.
pub fn attach_rwnd_init(cgroup: &Path, name: &str, segments: u32) -> io::Result<Attached> {
    let program = [
        // r2 = ctx->op
        insn(LDX_W, 2, 1, 0, 0),
        // if r2 != RWND_INIT goto out
        insn(JNE_K, 2, 0, 2, BPF_SOCK_OPS_RWND_INIT),
        insn(MOV64_K, 3, 0, 0, segments as i32),
        // ctx->reply = r3 (a register store: the verifier refuses an
        // immediate store into the context before 6.4)
        insn(STX_W, 1, 3, 4, 0),
        // out: return 1
        insn(MOV64_K, 0, 0, 0, 1),
        insn(EXIT, 0, 0, 0, 0),
    ];
    attach(
        cgroup,
        name,
        BPF_PROG_TYPE_SOCK_OPS,
        BPF_CGROUP_SOCK_OPS,
        &program,
    )
}

/// A `connect4` program that lets every connect through unchanged, the
/// stand-in for another tool's socket-level load balancer.
pub fn attach_passthrough_connect4(cgroup: &Path, name: &str) -> io::Result<Attached> {
    let program = [insn(MOV64_K, 0, 0, 0, 1), insn(EXIT, 0, 0, 0, 0)];
    attach(
        cgroup,
        name,
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET4_CONNECT,
        &program,
    )
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_LINK_CREATE, up to `flags`.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

pub(crate) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, correctly sized `bpf_attr` prefix; the
    // kernel reads the bytes it knows and treats the rest as zero.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn attach(
    cgroup: &Path,
    name: &str,
    prog_type: u32,
    attach_type: u32,
    program: &[Insn],
) -> io::Result<Attached> {
    let license = CString::new("GPL").map_err(io::Error::other)?;
    let mut prog_name = [0u8; 16];
    let len = name.len().min(15);
    prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    let mut log = vec![0u8; 64 * 1024];
    let mut load = ProgLoadAttr {
        prog_type,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: attach_type,
    };
    let prog = bpf(BPF_PROG_LOAD, &mut load).map_err(|e| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        io::Error::new(
            e.kind(),
            format!(
                "loading {name}: {e}; verifier: {}",
                String::from_utf8_lossy(&log[..end])
            ),
        )
    })?;
    let cgroup_dir = File::open(cgroup)?;
    let mut link = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup_dir.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let link = bpf(BPF_LINK_CREATE, &mut link)?;
    Ok(Attached {
        name: name[..len].to_string(),
        _prog: prog,
        _link: link,
    })
}
