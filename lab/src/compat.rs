//! `xenft-lab compat`: what this machine can run, per protection level, and why — for Xen and
//! for the local pool's Linux stand-ins. Only facts read from the machine (libxenctrl load,
//! /dev, /proc, the `ip` tool, the running lab's A-link status); nothing assumed.

use std::path::Path;

use serde::Serialize;

use crate::pool::node_status;
use crate::state::StateDir;
use crate::topology::Host;

/// One fact with its evidence.
#[derive(Debug, Clone, Serialize)]
pub struct Fact {
    /// What.
    pub name: &'static str,
    /// Present / usable.
    pub ok: bool,
    /// The evidence.
    pub detail: String,
}

/// Support of one level on one platform.
#[derive(Debug, Clone, Serialize)]
pub struct LevelSupport {
    /// Xen or the local pool.
    pub platform: &'static str,
    /// 1, 2 or 3.
    pub level: u8,
    /// Supported.
    pub supported: bool,
    /// Why (the facts it rests on).
    pub why: String,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct CompatReport {
    /// Facts.
    pub facts: Vec<Fact>,
    /// Per level and platform.
    pub levels: Vec<LevelSupport>,
}

fn mem_available_mib() -> Option<u64> {
    let t = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Gathers the facts of this machine (and of the running lab pool in `dir`, if any).
#[must_use]
pub fn check(dir: &StateDir) -> CompatReport {
    let xen = match xenft_checkpoint::xen::XenDomain::open(0, 1) {
        Ok(_) => Fact {
            name: "xen",
            ok: true,
            detail: "libxenctrl loaded and the hypervisor answered".into(),
        },
        Err(e) => Fact {
            name: "xen",
            ok: false,
            detail: e.to_string(),
        },
    };
    let uffd = Path::new("/dev/userfaultfd").exists()
        || Path::new("/proc/sys/vm/unprivileged_userfaultfd").exists();
    let uffd = Fact {
        name: "userfaultfd",
        ok: uffd,
        detail: if uffd {
            "present: the synthetic guest's dirty pages are tracked by the kernel (write-protect)"
                .into()
        } else {
            "absent: no dirty tracking for the synthetic guest".into()
        },
    };
    let root = nix::unistd::geteuid().is_root();
    let ip = crate::topology::run("ip", &["-V"]);
    let netns = Fact {
        name: "network namespaces",
        ok: root && ip.is_ok(),
        detail: match (&ip, root) {
            (Ok(v), true) => format!("root and {}", v.trim()),
            (Ok(_), false) => "not root: cannot create namespaces".into(),
            (Err(e), _) => e.to_string(),
        },
    };
    let mem = mem_available_mib();
    let memory = Fact {
        name: "free memory",
        ok: mem.is_some_and(|m| m >= 256),
        detail: mem.map_or_else(
            || "unreadable /proc/meminfo".into(),
            |m| format!("{m} MiB available (a lab VM needs 16 MiB guest + its replica)"),
        ),
    };
    let alinks = match node_status(dir, Host::Host1) {
        Ok(Some(s)) => {
            let up = s.link.paths.iter().filter(|p| p.up).count();
            let rtts: Vec<String> = s
                .link
                .paths
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    format!(
                        "alink{} {}",
                        i + 1,
                        p.rtt_ms
                            .filter(|_| p.up)
                            .map_or_else(|| "down".into(), |r| format!("{r:.2} ms"))
                    )
                })
                .collect();
            Fact {
                name: "a-links",
                ok: up >= 2,
                detail: format!("lab pool: {up} of 2 up ({})", rtts.join(", ")),
            }
        }
        _ => Fact {
            name: "a-links",
            ok: false,
            detail: "no lab pool running (xenft-lab up) and no Xen pool: no A-links to measure"
                .into(),
        },
    };
    let local_ok = netns.ok && memory.ok;
    let mut levels = Vec::new();
    for level in 1..=3u8 {
        levels.push(LevelSupport {
            platform: "xen",
            level,
            supported: xen.ok,
            why: if xen.ok {
                "Xen present".into()
            } else {
                format!("no Xen: {}", xen.detail)
            },
        });
    }
    levels.push(LevelSupport {
        platform: "local pool",
        level: 1,
        supported: false,
        why: "restart on reserved capacity is not part of the local pool".into(),
    });
    levels.push(LevelSupport {
        platform: "local pool",
        level: 2,
        supported: local_ok,
        why: format!(
            "disk mirroring over veth A-links needs namespaces ({}) and memory ({})",
            netns.detail, memory.detail
        ),
    });
    levels.push(LevelSupport {
        platform: "local pool",
        level: 3,
        supported: local_ok && uffd.ok,
        why: format!(
            "level 2 plus checkpointing a synthetic guest, which needs userfaultfd ({})",
            uffd.detail
        ),
    });
    CompatReport {
        facts: vec![xen, uffd, netns, memory, alinks],
        levels,
    }
}

impl std::fmt::Display for CompatReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "facts:")?;
        for x in &self.facts {
            let mark = if x.ok { "yes" } else { "no " };
            writeln!(f, "  {mark} {:<20} {}", x.name, x.detail)?;
        }
        writeln!(f, "levels:")?;
        for l in &self.levels {
            let mark = if l.supported {
                "supported    "
            } else {
                "NOT supported"
            };
            writeln!(
                f,
                "  {:<10} level {}: {mark} {}",
                l.platform, l.level, l.why
            )?;
        }
        Ok(())
    }
}
