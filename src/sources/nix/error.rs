//! What can go wrong talking to Nix: [`NixError`], with the [`Step`] that
//! failed and the useful tail of Nix's stderr where there is one.

use std::fmt;
use std::io;
use std::time::Duration;

/// Which Nix call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Version,
    Evaluate,
    Build,
    Query,
    GcRoot,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Version => "version check",
            Step::Evaluate => "evaluation",
            Step::Build => "build",
            Step::Query => "store query",
            Step::GcRoot => "GC root",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("Nix is not installed or not runnable ({program}: {source}); install nix-bin")]
    NotInstalled {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("running {program}: {source}")]
    Io {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("Nix {step} timed out after {}s:\n{stderr_tail}", after.as_secs_f64())]
    Timeout {
        step: Step,
        after: Duration,
        stderr_tail: String,
    },
    #[error("{}", missing_message(missing, not_packages))]
    MissingPackages {
        /// Names with no attribute in the package set.
        missing: Vec<String>,
        /// Names that exist but are not derivations (e.g. `python3Packages`).
        not_packages: Vec<String>,
    },
    #[error("invalid package source: {0}")]
    InvalidSource(String),
    #[error("no Nix package set is configured: `<nixpkgs>` is not in NIX_PATH; start the daemon with --pkgs-path PATH, --pkgs-channel NAME or --pkgs-repo URL, or set NIX_PATH=nixpkgs=…")]
    NoPackageSource,
    #[error(
        "this host cannot build for {system} (no builder or substitute for it):\n{stderr_tail}"
    )]
    UnsupportedSystem { system: String, stderr_tail: String },
    #[error("Nix evaluation failed ({status}):\n{stderr_tail}")]
    EvalFailed { status: String, stderr_tail: String },
    #[error("Nix build failed ({status}):\n{stderr_tail}")]
    BuildFailed { status: String, stderr_tail: String },
    #[error("Nix {step} failed ({status}):\n{stderr_tail}")]
    CommandFailed {
        step: Step,
        status: String,
        stderr_tail: String,
    },
    #[error("unexpected output from Nix {step}: {detail}")]
    BadOutput { step: Step, detail: String },
}

fn missing_message(missing: &[String], not_packages: &[String]) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("unknown packages: {}", missing.join(", ")));
    }
    if !not_packages.is_empty() {
        parts.push(format!(
            "not packages (attribute sets or other values): {}",
            not_packages.join(", ")
        ));
    }
    parts.join("; ")
}
