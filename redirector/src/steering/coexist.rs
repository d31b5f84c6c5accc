//! Other programs on redirector's hooks. Programs attached at the same
//! cgroup run in attach order; one that rewrites connects before ours runs
//! (Cilium's socket load balancer turns a Service's ClusterIP into a pod
//! address) leaves nothing for our target match, and steering silently
//! never happens. `status` and start-up name such programs.

use std::{fs::File, path::Path};

use serde::Serialize;

use super::sys;

/// A program that runs on one of our hooks before ours.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForeignProgram {
    pub hook: &'static str,
    pub prog_id: u32,
    pub name: String,
}

/// The programs in `effective` (run order) that run before `ours`. All of
/// them when ours is not there at all (not attached: everything runs first).
pub fn running_before(effective: &[u32], ours: u32) -> Vec<u32> {
    effective
        .iter()
        .copied()
        .take_while(|id| *id != ours)
        .collect()
}

/// The foreign programs that run before ours on the connect hooks of
/// `cgroup_root`. `ours` holds our program ids by hook attach type.
pub fn foreign_connect_programs(
    cgroup_root: &Path,
    ours: &[(u32, u32)],
) -> std::io::Result<Vec<ForeignProgram>> {
    let cgroup = File::open(cgroup_root)?;
    let mut found = Vec::new();
    for (attach_type, our_id) in ours {
        let effective = sys::effective_programs(&cgroup, *attach_type)?;
        for prog_id in running_before(&effective, *our_id) {
            found.push(ForeignProgram {
                hook: sys::attach_type_name(*attach_type),
                prog_id,
                name: program_name(prog_id),
            });
        }
    }
    Ok(found)
}

fn program_name(id: u32) -> String {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|info| info.id() == id)
        .and_then(|info| info.name_as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_programs_ahead_of_ours_are_named() {
        assert_eq!(running_before(&[7, 9, 42, 11], 42), vec![7, 9]);
        assert_eq!(running_before(&[42, 11], 42), Vec::<u32>::new());
        assert_eq!(
            running_before(&[5], 42),
            vec![5],
            "ours missing: all run first"
        );
        assert!(running_before(&[], 42).is_empty());
    }
}
