//! The open-file limit (`RLIMIT_NOFILE`). Every MQTT connection is a file descriptor, at the
//! server and at each simulated device, so 100,000 devices need more than the usual soft
//! limit (1,024) and often more than the hard limit (20,000 on the benchmark machine). Ingest
//! (for `MQTT_MAX_CONNECTIONS`) and `simulate --via mqtt` (for `--devices`) raise it at
//! start-up: the soft limit up to the hard one, and the hard one too when the process may
//! (root, or `CAP_SYS_RESOURCE`), never past the kernel's `fs.nr_open`. Never lowered.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// File descriptors kept aside for everything but the connections: Kafka and database
/// sockets, the HTTP listener and its clients, log files.
pub const RESERVE: u64 = 4096;

/// The limits before and after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// Soft and hard limit found.
    pub before: (u64, u64),
    /// Soft and hard limit now.
    pub now: (u64, u64),
}

impl FdLimit {
    /// Whether the soft limit now allows `needed` descriptors.
    pub fn allows(&self, needed: u64) -> bool {
        self.now.0 >= needed
    }
}

impl std::fmt::Display for FdLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RLIMIT_NOFILE soft/hard {}/{} (was {}/{})",
            self.now.0, self.now.1, self.before.0, self.before.1
        )
    }
}

/// Raises the soft open-file limit to `needed` (the hard one too when it is lower and the
/// process may raise it). What could not be raised stays as it was; the caller compares
/// [`FdLimit::allows`].
pub fn raise(needed: u64) -> Result<FdLimit, nix::Error> {
    let before = getrlimit(Resource::RLIMIT_NOFILE)?;
    let (soft, hard) = before;
    if soft >= needed {
        return Ok(FdLimit {
            before,
            now: before,
        });
    }
    // The kernel refuses a hard limit above fs.nr_open.
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let wanted = needed.min(ceiling.max(hard));
    if wanted > hard && setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        return Ok(FdLimit {
            before,
            now: (wanted, wanted),
        });
    }
    // Not allowed to raise the hard limit: as far as it goes.
    let soft_now = wanted.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, soft_now, hard)?;
    Ok(FdLimit {
        before,
        now: (soft_now, hard),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_to_what_is_already_allowed_changes_nothing() {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((0, 0));
        let limit = raise(soft).unwrap_or(FdLimit {
            before: (0, 0),
            now: (0, 0),
        });
        assert_eq!(limit.before, (soft, hard));
        assert_eq!(limit.now, (soft, hard));
        assert!(limit.allows(soft));
    }
}
