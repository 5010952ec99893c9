//! Which cache a command uses, and as whom. Every command but `serve` uses
//! the service's cache when the service is installed (its config file
//! names it), and a command run as root works as the cache's owner, so the
//! files it writes stay the service's. Where neither is possible, the
//! command says so rather than quietly using another directory.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use clap::Args;

use nixery_local::config::{Options, Settings};
use nixery_local::util::users;

use super::{settings, Common, Failure};

/// The packaged service's config file (the .deb's and the NixOS module's).
pub(super) const SYSTEM_CONFIG: &str = "/etc/nixery-local/config.toml";

/// Where the cache is, for the commands that only read or change the cache
/// (not every option of `serve`).
#[derive(Args)]
pub(super) struct CacheArgs {
    /// TOML config file, the same as `serve --config`; only its cache
    /// settings matter here [default: /etc/nixery-local/config.toml when it
    /// exists: the service's cache].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The cache directory [default: the config's `state-dir`, else as for
    /// `serve`].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// What a command does to the cache.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Read,
    Write,
}

impl CacheArgs {
    /// The settings, with the cache entered for `access`.
    pub(super) fn settings(self, flags: Options, access: Access) -> Result<Settings, Failure> {
        let common = Common {
            config: self.config,
            options: Options {
                state_dir: self.state_dir,
                ..flags
            },
        };
        common.cache_settings(access)
    }
}

impl Common {
    /// [`Common::settings`] for a command that works on the cache (build,
    /// prefetch), with the service's config as the default.
    pub(super) fn cache_settings(self, access: Access) -> Result<Settings, Failure> {
        let settings = self.system_settings()?;
        enter(&settings.state_dir, access)?;
        Ok(settings)
    }

    /// [`Common::settings`] with the service's config as the default, for a
    /// command that only looks (doctor).
    pub(super) fn system_settings(self) -> Result<Settings, Failure> {
        let given = self.options.state_dir.is_some();
        let config = config_or_system(self.config, given)?;
        settings(config, self.options)
    }
}

/// The config to read: the one named, else the service's when it is
/// installed and no cache directory was named.
fn config_or_system(
    config: Option<PathBuf>,
    state_dir_given: bool,
) -> Result<Option<PathBuf>, Failure> {
    if config.is_some() || state_dir_given {
        return Ok(config);
    }
    let system = Path::new(SYSTEM_CONFIG);
    match std::fs::File::open(system) {
        Ok(_) => Ok(Some(system.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(Failure::Usage(format!(
            "{SYSTEM_CONFIG} names the service's cache, but you cannot read it: \
             run with sudo (or join the group nixery-local), or pass --state-dir DIR \
             for a cache of your own"
        ))),
        Err(e) => Err(Failure::Usage(format!("reading {SYSTEM_CONFIG}: {e}"))),
    }
}

/// Enters the cache at `dir`: root becomes the cache's owner (so what it
/// writes stays the owner's); anyone else must have the access needed.
fn enter(dir: &Path, access: Access) -> Result<(), Failure> {
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        // A new cache is created by whoever runs first.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Failure::Failed(e.into())),
    };
    // SAFETY: geteuid cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        if meta.uid() != 0 {
            become_user(meta.uid(), dir)?;
        }
        return Ok(());
    }
    let mode = match access {
        Access::Read => libc::R_OK | libc::X_OK,
        Access::Write => libc::R_OK | libc::W_OK | libc::X_OK,
    };
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Failure::Usage(format!("{}: a NUL byte in the path", dir.display())))?;
    // SAFETY: `path` is a valid NUL-terminated string for the call.
    if unsafe { libc::access(path.as_ptr(), mode) } == 0 {
        return Ok(());
    }
    let verb = match access {
        Access::Read => "read",
        Access::Write => "write to",
    };
    Err(Failure::Failed(anyhow::anyhow!(
        "you cannot {verb} the cache {} (owned by {}): run with sudo, or pass \
         --state-dir DIR for a cache of your own",
        dir.display(),
        user_name(meta.uid()).unwrap_or_else(|| format!("uid {}", meta.uid())),
    )))
}

fn user_name(uid: u32) -> Option<String> {
    users::by_uid(uid).map(|a| a.name.to_string_lossy().into_owned())
}

/// Drops root for the cache owner's uid, groups (the Nix daemon's socket is
/// gated by a group) and home. Runs before any thread is started.
fn become_user(uid: u32, dir: &Path) -> Result<(), Failure> {
    let who = users::by_uid(uid).ok_or_else(|| {
        Failure::Failed(anyhow::anyhow!(
            "the cache {} is owned by uid {uid}, which has no account",
            dir.display()
        ))
    })?;
    let fail = |step: &str| {
        Failure::Failed(anyhow::anyhow!(
            "becoming {} (the owner of the cache {}): {step}: {}",
            who.name.to_string_lossy(),
            dir.display(),
            io::Error::last_os_error()
        ))
    };
    // SAFETY: plain system calls on valid arguments; the order (groups, gid,
    // then uid) is the only one that works, since each needs root.
    unsafe {
        if libc::initgroups(who.name.as_ptr(), who.gid) != 0 {
            return Err(fail("initgroups"));
        }
        if libc::setgid(who.gid) != 0 {
            return Err(fail("setgid"));
        }
        if libc::setuid(uid) != 0 {
            return Err(fail("setuid"));
        }
    }
    // Said, so that a file the owner cannot read (an import's layout under
    // /root, say) makes sense.
    eprintln!(
        "nixery-local: working as {}, the owner of the cache {}",
        who.name.to_string_lossy(),
        dir.display()
    );
    // Nix and XDG caches go under the owner's home, as for the service.
    // The command line is still single-threaded here.
    std::env::set_var("HOME", &who.home);
    std::env::remove_var("XDG_CACHE_HOME");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_config_or_state_dir_wins_over_the_system_config() {
        let named = PathBuf::from("/some/config.toml");
        assert_eq!(
            config_or_system(Some(named.clone()), false).ok().flatten(),
            Some(named)
        );
        assert!(matches!(config_or_system(None, true), Ok(None)));
    }
}
