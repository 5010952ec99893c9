//! Talking to Nix. This module owns:
//!
//! - [`ImageName`]: the path components of a Nix image's repository name
//!   (after the caller stripped the Nix namespace) → validated, sorted,
//!   deduplicated package attribute paths plus the `shell`/`arm64` flags;
//! - [`Nix`]: evaluation and builds on the host's Nix (`nix-instantiate`,
//!   `nix-store`; daemon or single-user, whatever the environment says), with
//!   a deadline, process-group kill on timeout and the useful tail of Nix's
//!   stderr in every error;
//! - [`ClosureGraph`]: the runtime closure of what was built, with NAR sizes
//!   and references, which [`crate::sources::nix::layers`] turns into layers.
//!
//! Names never reach Nix as code. One constant expression ([`REQUEST_EXPR`])
//! takes the request as JSON through `--argstr request` and resolves every
//! attribute path with `hasAttr`/`getAttr`, so a hostile name is at worst a
//! missing attribute.
//!
//! Everything here blocks (it waits for child processes): call it from
//! `tokio::task::spawn_blocking`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------
// Image names
// ---------------------------------------------------------------------------

/// At most this many path components in one image name.
pub const MAX_COMPONENTS: usize = 32;
/// At most this many characters in one component (`python3Packages.requests`).
pub const MAX_COMPONENT_LEN: usize = 200;
/// At most this many `.`-separated segments in one attribute path.
pub const MAX_SEGMENTS: usize = 8;
/// At most this many characters in one attribute path segment.
pub const MAX_SEGMENT_LEN: usize = 100;

/// What the `shell` meta-package stands for (Nixery's set).
pub const SHELL_PACKAGES: [&str; 4] = ["bashInteractive", "coreutils", "moreutils", "nano"];
/// The Nix system the `arm64` meta-package selects.
pub const ARM64_SYSTEM: &str = "aarch64-linux";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageNameError {
    #[error("the image name has no components")]
    Empty,
    #[error("the image name has an empty path component")]
    EmptyComponent,
    #[error("the image name has {count} components, at most {max} are allowed")]
    TooManyComponents { count: usize, max: usize },
    #[error("component {component:?} is longer than {max} characters")]
    ComponentTooLong { component: String, max: usize },
    #[error("component {component:?} is not a package attribute path: {reason}")]
    InvalidComponent {
        component: String,
        reason: &'static str,
    },
    #[error("the image name names no packages, only meta-packages")]
    NoPackages,
}

/// One requested package: the attribute path as written (after the `_`
/// prefix rule) and its segments.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttrPath(String);

impl AttrPath {
    /// Validates one attribute path: segments `[A-Za-z0-9_][A-Za-z0-9_'-]*`
    /// joined by `.`. A leading digit is allowed because registry names may
    /// start with one; the first segment then gets nixpkgs' `_` prefix
    /// (`1password` → `_1password`). Nested segments starting with a digit
    /// stay as written; the Nix side also tries them with `_`.
    pub fn parse(component: &str) -> Result<AttrPath, ImageNameError> {
        let invalid = |reason| ImageNameError::InvalidComponent {
            component: component.to_owned(),
            reason,
        };
        if component.len() > MAX_COMPONENT_LEN {
            return Err(ImageNameError::ComponentTooLong {
                component: component.chars().take(40).collect::<String>() + "…",
                max: MAX_COMPONENT_LEN,
            });
        }
        let segments: Vec<&str> = component.split('.').collect();
        if segments.len() > MAX_SEGMENTS {
            return Err(invalid("too many '.'-separated segments"));
        }
        for seg in &segments {
            let mut bytes = seg.bytes();
            match bytes.next() {
                None => return Err(invalid("empty attribute name")),
                Some(b) if b.is_ascii_alphanumeric() || b == b'_' => {}
                Some(_) => {
                    return Err(invalid("attribute names start with a letter, digit or '_'"))
                }
            }
            if !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'\'' | b'-')) {
                return Err(invalid(
                    "attribute names contain only letters, digits, '_', '\\'' and '-'",
                ));
            }
            if seg.len() > MAX_SEGMENT_LEN {
                return Err(invalid("attribute name too long"));
            }
        }
        let mut path = String::with_capacity(component.len() + 1);
        if segments[0].starts_with(|c: char| c.is_ascii_digit()) {
            path.push('_');
        }
        path.push_str(component);
        Ok(AttrPath(path))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }
}

impl fmt::Display for AttrPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed Nix image name. Two names that differ only in component order
/// or repetition are equal, and so are their [`ImageName::canonical`] keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageName {
    /// Sorted, deduplicated, `shell` already expanded.
    packages: Vec<AttrPath>,
    /// `Some("aarch64-linux")` for `arm64`; `None` builds for the host.
    system: Option<String>,
    /// `shell` was given: the image's `Cmd` is `bash`.
    shell: bool,
}

impl ImageName {
    /// Parses the repository path below the Nix namespace, e.g.
    /// `shell/git/htop`. The meta-packages `shell` and `arm64` are
    /// recognised in any position, since order carries no meaning.
    pub fn parse(repo_path: &str) -> Result<ImageName, ImageNameError> {
        if repo_path.is_empty() {
            return Err(ImageNameError::Empty);
        }
        Self::from_components(repo_path.split('/'))
    }

    pub fn from_components<'a>(
        components: impl IntoIterator<Item = &'a str>,
    ) -> Result<ImageName, ImageNameError> {
        let mut packages = BTreeSet::new();
        let mut system = None;
        let mut shell = false;
        let mut count = 0usize;
        for component in components {
            count += 1;
            if count > MAX_COMPONENTS {
                return Err(ImageNameError::TooManyComponents {
                    count,
                    max: MAX_COMPONENTS,
                });
            }
            match component {
                "" => return Err(ImageNameError::EmptyComponent),
                "shell" => shell = true,
                "arm64" => system = Some(ARM64_SYSTEM.to_owned()),
                _ => {
                    packages.insert(AttrPath::parse(component)?);
                }
            }
        }
        if count == 0 {
            return Err(ImageNameError::Empty);
        }
        if shell {
            packages.extend(SHELL_PACKAGES.iter().map(|p| AttrPath(p.to_string())));
        }
        if packages.is_empty() {
            return Err(ImageNameError::NoPackages);
        }
        Ok(ImageName {
            packages: packages.into_iter().collect(),
            system,
            shell,
        })
    }

    pub fn packages(&self) -> &[AttrPath] {
        &self.packages
    }

    /// The Nix system to build for; `None` means the host's.
    pub fn system(&self) -> Option<&str> {
        self.system.as_deref()
    }

    pub fn shell(&self) -> bool {
        self.shell
    }

    /// The image config's `Cmd`: `bash` for `shell` images, else none.
    pub fn cmd(&self) -> Option<Vec<String>> {
        self.shell.then(|| vec!["bash".to_owned()])
    }

    /// A stable key for caches: flags, then the sorted expanded packages,
    /// joined by `/` (`arm64/shell/bashInteractive/…/git`).
    pub fn canonical(&self) -> String {
        let mut parts: Vec<&str> = Vec::new();
        if self.system.is_some() {
            parts.push("arm64");
        }
        if self.shell {
            parts.push("shell");
        }
        parts.extend(self.packages.iter().map(AttrPath::as_str));
        parts.join("/")
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

// ---------------------------------------------------------------------------
// Package sources
// ---------------------------------------------------------------------------

/// Where packages come from. Serialised into the request JSON as is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PkgSource {
    /// A local file or directory that, imported and called with `{}` (or
    /// `{ system = …; }` for `arm64`), yields an attribute set. Absolute.
    Path { path: PathBuf },
    /// A nixpkgs channel (`nixos-24.05`), fetched as
    /// `https://channels.nixos.org/<channel>/nixexprs.tar.xz`.
    Channel { channel: String },
    /// A git repository at a commit (`rev`), a ref, or its default branch.
    Git {
        url: String,
        rev: Option<String>,
        #[serde(rename = "ref")]
        git_ref: Option<String>,
    },
    /// `<nixpkgs>` from `NIX_PATH`.
    NixPath,
    /// A flake's `legacyPackages.<system>` (needs a Nix with flakes).
    Flake { flake: String },
}

impl PkgSource {
    /// A git source for an image tag: a 40-hex tag pins the commit,
    /// `latest` follows the default branch, anything else names a ref.
    pub fn git_for_tag(url: &str, tag: &str) -> PkgSource {
        let is_commit = tag.len() == 40 && tag.bytes().all(|b| b.is_ascii_hexdigit());
        PkgSource::Git {
            url: url.to_owned(),
            rev: is_commit.then(|| tag.to_ascii_lowercase()),
            git_ref: (!is_commit && tag != "latest").then(|| tag.to_owned()),
        }
    }

    /// Checks what the expression cannot: paths are absolute, channel names
    /// are plain names, URLs and flake references are non-empty.
    pub fn validate(&self) -> Result<(), NixError> {
        let bad = |why: String| Err(NixError::InvalidSource(why));
        match self {
            PkgSource::Path { path } if !path.is_absolute() => {
                bad(format!("package path {} is not absolute", path.display()))
            }
            PkgSource::Channel { channel }
                if channel.is_empty()
                    || channel.starts_with('.')
                    || !channel
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) =>
            {
                bad(format!("channel name {channel:?} is not a plain name"))
            }
            PkgSource::Git { url, .. } if url.is_empty() => bad("empty git URL".into()),
            PkgSource::Flake { flake } if flake.is_empty() => bad("empty flake reference".into()),
            _ => Ok(()),
        }
    }

    /// Whether the same request always evaluates to the same result (a
    /// commit-pinned git source). Everything else floats.
    pub fn is_pinned(&self) -> bool {
        matches!(self, PkgSource::Git { rev: Some(_), .. })
    }
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

/// One output of a resolved package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageOutput {
    pub name: String,
    pub path: String,
}

/// A requested package as Nix resolved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedPackage {
    /// The attribute path as requested (`python3packages.requests`).
    pub request: String,
    /// The attribute path that matched (`python3Packages.requests`).
    pub attr: String,
    /// The derivation's `name` (`python3.11-requests-2.31.0`).
    pub name: String,
    pub drv_path: String,
    /// `meta.outputsToInstall` (what `nix-env` would install), else the
    /// default output.
    pub outputs: Vec<PackageOutput>,
    #[serde(default)]
    pub main_program: Option<String>,
    /// Added by [`NixConfig::always_include`], not by the name.
    #[serde(default)]
    pub optional: bool,
}

/// What evaluation found for an image name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The Nix system the packages are built for (`x86_64-linux`).
    pub system: String,
    /// Requested packages first (in name order), then optional ones;
    /// duplicates (two names for one derivation) removed.
    pub packages: Vec<ResolvedPackage>,
}

impl Evaluation {
    /// Every output path of every package, in package order.
    pub fn output_paths(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        self.packages
            .iter()
            .flat_map(|p| p.outputs.iter())
            .filter(|o| seen.insert(o.path.clone()))
            .map(|o| o.path.clone())
            .collect()
    }
}

/// One store path of a closure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorePathInfo {
    /// `/nix/store/<hash>-<name>`.
    pub path: String,
    /// Size of the path's NAR serialisation: its content size.
    pub nar_size: u64,
    /// `sha256:<hex>` of the NAR, as Nix registered it.
    pub nar_hash: String,
    /// Other store paths this one references (self-references removed).
    pub references: Vec<String>,
}

/// A runtime closure: every store path reachable from `roots`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClosureGraph {
    /// The requested outputs, deduplicated, in request order.
    pub roots: Vec<String>,
    /// Every path of the closure, by path.
    pub paths: BTreeMap<String, StorePathInfo>,
}

impl ClosureGraph {
    pub fn total_size(&self) -> u64 {
        self.paths.values().map(|p| p.nar_size).sum()
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Parses `nix-store --dump-db PATHS…` output: per path, its name, NAR
    /// hash (base16), NAR size, deriver (maybe empty), reference count and
    /// references.
    pub fn parse_dump_db(text: &str) -> Result<BTreeMap<String, StorePathInfo>, String> {
        let mut lines = text.lines();
        let mut out = BTreeMap::new();
        while let Some(path) = lines.next() {
            if path.is_empty() {
                continue;
            }
            let mut next = |what: &str| {
                lines
                    .next()
                    .ok_or_else(|| format!("dump-db output ends before the {what} of {path}"))
            };
            let hash = next("hash")?;
            let size = next("size")?;
            let _deriver = next("deriver")?;
            let count = next("reference count")?;
            let nar_size: u64 = size
                .parse()
                .map_err(|_| format!("bad NAR size {size:?} for {path}"))?;
            let count: usize = count
                .parse()
                .map_err(|_| format!("bad reference count {count:?} for {path}"))?;
            let mut references = Vec::with_capacity(count);
            for _ in 0..count {
                let r = next("references")?;
                if r != path {
                    references.push(r.to_owned());
                }
            }
            references.sort();
            references.dedup();
            let nar_hash = if hash.contains(':') {
                hash.to_owned()
            } else {
                format!("sha256:{hash}")
            };
            out.insert(
                path.to_owned(),
                StorePathInfo {
                    path: path.to_owned(),
                    nar_size,
                    nar_hash,
                    references,
                },
            );
        }
        Ok(out)
    }
}

/// The result of [`Nix::build`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltImage {
    pub evaluation: Evaluation,
    pub closure: ClosureGraph,
    /// GC root links created for the outputs (see [`Nix::build`]).
    pub gc_roots: Vec<PathBuf>,
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

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

impl NixError {
    /// The tail of Nix's stderr, when the error has one.
    pub fn stderr_tail(&self) -> Option<&str> {
        match self {
            NixError::Timeout { stderr_tail, .. }
            | NixError::UnsupportedSystem { stderr_tail, .. }
            | NixError::EvalFailed { stderr_tail, .. }
            | NixError::BuildFailed { stderr_tail, .. }
            | NixError::CommandFailed { stderr_tail, .. } => Some(stderr_tail),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// The request expression
// ---------------------------------------------------------------------------

/// The only Nix code this daemon runs. It is a constant: the request (source,
/// system, package attribute paths split into segments) arrives as JSON via
/// `--argstr request`, and every lookup is `hasAttr`/`getAttr` on data.
///
/// Lookups per segment: exact name; for a segment starting with a digit,
/// `_` + name; at the top level only, the attribute whose lowercased name
/// equals the (lowercase) segment (registry names cannot carry uppercase).
/// The result is JSON: `{ system; missing; notPackages; packages }`, or
/// `{ error = "no-nixpkgs"; }` when `<nixpkgs>` was asked for and is not in
/// the search path.
pub const REQUEST_EXPR: &str = r#"
{ request }:
let
  req = builtins.fromJSON request;
  src = req.source;
  system = if req.system == null then builtins.currentSystem else req.system;
  importArgs = if req.system == null then { } else { inherit system; };
  load = f: let v = import f; in if builtins.isFunction v then v importArgs else v;
  hasNixpkgs = builtins.any (e: (e.prefix or "") == "nixpkgs") builtins.nixPath;
  gitArgs = { url = src.url; }
    // (if (src.rev or null) != null then { rev = src.rev; allRefs = true; } else { })
    // (if (src.ref or null) != null then { ref = src.ref; } else { });
  pkgs =
    if src.type == "path" then load (/. + src.path)
    else if src.type == "channel" then
      load (builtins.fetchTarball "https://channels.nixos.org/${src.channel}/nixexprs.tar.xz")
    else if src.type == "git" then load (builtins.fetchGit gitArgs)
    else if src.type == "flake" then (builtins.getFlake src.flake).legacyPackages.${system}
    else if src.type == "nixpath" then (if hasNixpkgs then load <nixpkgs> else null)
    else throw "nixery-local: unknown package source type ${src.type}";

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;
  # Lowercased top-level name -> real name, for names with uppercase. Lazy:
  # only built when an exact lookup misses. attrNames is sorted and
  # listToAttrs keeps the first of duplicate names, so the first camelCase
  # spelling (in byte order) wins when two collide.
  lowerTop = builtins.listToAttrs (map (n: { name = toLower n; value = n; })
    (builtins.filter (n: toLower n != n) (builtins.attrNames pkgs)));

  isDigitLed = s: builtins.match "[0-9].*" s != null;
  lookup = top: set: seg:
    if !(builtins.isAttrs set) then null
    else if builtins.hasAttr seg set then seg
    else if isDigitLed seg && builtins.hasAttr ("_" + seg) set then "_" + seg
    else if top && builtins.hasAttr seg lowerTop then lowerTop.${seg}
    else null;
  walk = set: segs: real: top:
    if segs == [ ] then { found = true; value = set; attr = real; }
    else
      let name = lookup top set (builtins.head segs); in
      if name == null then { found = false; }
      else walk (builtins.getAttr name set) (builtins.tail segs) (real ++ [ name ]) false;

  isDrv = v: builtins.isAttrs v && (v.type or null) == "derivation";
  describe = p: r:
    let
      d = r.value;
      all = d.outputs or [ "out" ];
      wanted = builtins.filter (o: builtins.elem o all) (d.meta.outputsToInstall or [ ]);
      outs = if wanted == [ ] then [ (d.outputName or "out") ] else wanted;
    in {
      request = p.request;
      attr = builtins.concatStringsSep "." r.attr;
      name = d.name;
      drvPath = d.drvPath;
      outputs = map (o: { name = o; path = (builtins.getAttr o d).outPath; }) outs;
      mainProgram = d.meta.mainProgram or null;
      optional = p.optional;
    };

  results = map (p: { inherit p; r = walk pkgs p.path [ ] true; }) req.packages;
  isMissing = x: !x.r.found;
  isNotPackage = x: x.r.found && !(isDrv x.r.value);
  required = builtins.filter (x: !x.p.optional) results;
in
if pkgs == null then { error = "no-nixpkgs"; }
else {
  inherit system;
  missing = map (x: x.p.request) (builtins.filter isMissing required);
  notPackages = map (x: x.p.request) (builtins.filter isNotPackage required);
  packages = map (x: describe x.p x.r)
    (builtins.filter (x: x.r.found && isDrv x.r.value) results);
}
"#;

#[derive(Serialize)]
struct RequestPackage<'a> {
    request: &'a str,
    path: Vec<&'a str>,
    optional: bool,
}

#[derive(Serialize)]
struct Request<'a> {
    source: &'a PkgSource,
    system: Option<&'a str>,
    packages: Vec<RequestPackage<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EvalOutput {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    system: String,
    #[serde(default)]
    missing: Vec<String>,
    #[serde(default)]
    not_packages: Vec<String>,
    #[serde(default)]
    packages: Vec<ResolvedPackage>,
}

// ---------------------------------------------------------------------------
// Running Nix
// ---------------------------------------------------------------------------

/// How to run Nix.
#[derive(Debug, Clone)]
pub struct NixConfig {
    /// Directory holding `nix-instantiate` and `nix-store`; `None` searches
    /// `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// Deadline for one whole [`Nix::build`] (evaluation, build and queries).
    pub timeout: Duration,
    /// `--option NAME VALUE` pairs passed to every call (e.g.
    /// `substituters ""` offline).
    pub options: Vec<(String, String)>,
    /// Packages added to every image when the package set has them, as
    /// Nixery does with `cacert` and `iana-etc`; never reported missing.
    pub always_include: Vec<String>,
    /// How many lines of Nix's stderr errors carry.
    pub stderr_lines: usize,
}

impl Default for NixConfig {
    fn default() -> Self {
        NixConfig {
            bin_dir: None,
            timeout: Duration::from_secs(600),
            options: Vec::new(),
            always_include: vec!["cacert".to_owned(), "iana-etc".to_owned()],
            stderr_lines: 20,
        }
    }
}

/// A handle on the host's Nix. Cheap to clone; holds no processes.
#[derive(Debug, Clone)]
pub struct Nix {
    config: NixConfig,
}

/// Output of a child process that exited.
struct Finished {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr_tail: String,
}

/// stdout beyond this is an error: nothing we ask Nix for is that big.
const MAX_STDOUT: usize = 256 << 20;
/// Grace period between SIGTERM (Nix stops its builders) and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Paths per `nix-store` invocation, to stay far below ARG_MAX.
const ARGS_PER_CALL: usize = 2000;

impl Nix {
    pub fn new(config: NixConfig) -> Nix {
        Nix { config }
    }

    pub fn config(&self) -> &NixConfig {
        &self.config
    }

    fn program(&self, name: &str) -> PathBuf {
        match &self.config.bin_dir {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        }
    }

    fn base_args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        for (name, value) in &self.config.options {
            args.extend(["--option".into(), name.into(), value.into()]);
        }
        args
    }

    /// `nix-store --version`, e.g. `nix-store (Nix) 2.8.0`: a cheap check
    /// that Nix runs at all.
    pub fn version(&self) -> Result<String, NixError> {
        let deadline = Instant::now() + Duration::from_secs(30).min(self.config.timeout);
        let out = self.run(
            "nix-store",
            vec!["--version".into()],
            deadline,
            Step::Version,
        )?;
        let out = self.expect_success(out, Step::Version)?;
        Ok(String::from_utf8_lossy(&out).trim().to_owned())
    }

    /// Evaluates, builds and queries the closure of `name` from `source`,
    /// all within [`NixConfig::timeout`].
    ///
    /// With `gc_root`, the outputs are realised with `--add-root gc_root`:
    /// Nix creates the links `gc_root`, `gc_root-2`, … (returned in
    /// [`BuiltImage::gc_roots`]), which keep the whole closure alive until
    /// the caller removes them. Without it, a concurrent
    /// `nix-collect-garbage` may delete the outputs before they are read.
    pub fn build(
        &self,
        source: &PkgSource,
        name: &ImageName,
        gc_root: Option<&Path>,
    ) -> Result<BuiltImage, NixError> {
        let deadline = Instant::now() + self.config.timeout;
        self.init_store_once(deadline);
        let evaluation = self.evaluate_until(source, name, deadline)?;
        let (roots, gc_roots) = self.realise_until(&evaluation, gc_root, deadline)?;
        let closure = self.closure_until(&roots, deadline)?;
        Ok(BuiltImage {
            evaluation,
            closure,
            gc_roots,
        })
    }

    /// `nix-store --init`: creates the store's state directories and
    /// database if missing. On a fresh single-user store, concurrent first
    /// calls otherwise race (Nix 2.8: "creating symlink from
    /// '/nix/var/nix/gcroots/profiles' … File exists"). Through a daemon it
    /// is a no-op. [`Nix::build`] and [`Nix::evaluate`] run it once per
    /// process.
    pub fn init_store(&self) -> Result<(), NixError> {
        let deadline = Instant::now() + Duration::from_secs(60).min(self.config.timeout);
        let out = self.run("nix-store", vec!["--init".into()], deadline, Step::Version)?;
        self.expect_success(out, Step::Version).map(drop)
    }

    fn init_store_once(&self, deadline: Instant) {
        static INIT: std::sync::Once = std::sync::Once::new();
        INIT.call_once(|| {
            let deadline = deadline.min(Instant::now() + Duration::from_secs(60));
            let result = self
                .run("nix-store", vec!["--init".into()], deadline, Step::Version)
                .and_then(|out| self.expect_success(out, Step::Version));
            // Not fatal: whatever is wrong shows up again, with context, in
            // the call that needs the store.
            if let Err(e) = result {
                tracing::debug!(error = %e, "nix-store --init failed");
            }
        });
    }

    /// Resolves the packages of `name` (and [`NixConfig::always_include`])
    /// and instantiates their derivations, without building anything.
    /// Missing names are all reported at once.
    pub fn evaluate(&self, source: &PkgSource, name: &ImageName) -> Result<Evaluation, NixError> {
        let deadline = Instant::now() + self.config.timeout;
        self.init_store_once(deadline);
        self.evaluate_until(source, name, deadline)
    }

    fn evaluate_until(
        &self,
        source: &PkgSource,
        name: &ImageName,
        deadline: Instant,
    ) -> Result<Evaluation, NixError> {
        source.validate()?;
        let mut packages: Vec<RequestPackage> = name
            .packages()
            .iter()
            .map(|p| RequestPackage {
                request: p.as_str(),
                path: p.segments().collect(),
                optional: false,
            })
            .collect();
        for extra in &self.config.always_include {
            if !name.packages().iter().any(|p| p.as_str() == extra) {
                packages.push(RequestPackage {
                    request: extra,
                    path: extra.split('.').collect(),
                    optional: true,
                });
            }
        }
        let request = serde_json::to_string(&Request {
            source,
            system: name.system(),
            packages,
        })
        .map_err(|e| NixError::BadOutput {
            step: Step::Evaluate,
            detail: format!("cannot encode the request: {e}"),
        })?;

        let mut args = self.base_args();
        if matches!(source, PkgSource::Flake { .. }) {
            args.extend(["--extra-experimental-features".into(), "flakes".into()]);
        }
        // --read-write-mode: `--eval` alone computes drvPath without writing
        // the .drv files that `nix-store --realise` needs.
        args.extend(
            [
                "--eval",
                "--strict",
                "--json",
                "--read-write-mode",
                "--expr",
                REQUEST_EXPR,
                "--argstr",
                "request",
            ]
            .map(OsString::from),
        );
        args.push(request.into());

        let out = self.run("nix-instantiate", args, deadline, Step::Evaluate)?;
        let stdout = self.expect_success(out, Step::Evaluate)?;
        let parsed: EvalOutput =
            serde_json::from_slice(&stdout).map_err(|e| NixError::BadOutput {
                step: Step::Evaluate,
                detail: format!("{e}: {}", String::from_utf8_lossy(&stdout)),
            })?;
        if parsed.error.as_deref() == Some("no-nixpkgs") {
            return Err(NixError::NoPackageSource);
        }
        if let Some(other) = parsed.error {
            return Err(NixError::BadOutput {
                step: Step::Evaluate,
                detail: other,
            });
        }
        if !parsed.missing.is_empty() || !parsed.not_packages.is_empty() {
            return Err(NixError::MissingPackages {
                missing: parsed.missing,
                not_packages: parsed.not_packages,
            });
        }
        // Two names may resolve to one derivation (`bashinteractive` and
        // `bashInteractive`): keep the first.
        let mut seen = BTreeSet::new();
        let packages = parsed
            .packages
            .into_iter()
            .filter(|p| seen.insert(p.drv_path.clone()))
            .collect();
        Ok(Evaluation {
            system: parsed.system,
            packages,
        })
    }

    /// Builds (or substitutes) the outputs of an evaluation; returns the
    /// realised output paths and any GC root links (see [`Nix::build`]).
    pub fn realise(
        &self,
        evaluation: &Evaluation,
        gc_root: Option<&Path>,
    ) -> Result<(Vec<String>, Vec<PathBuf>), NixError> {
        self.realise_until(evaluation, gc_root, Instant::now() + self.config.timeout)
    }

    fn realise_until(
        &self,
        evaluation: &Evaluation,
        gc_root: Option<&Path>,
        deadline: Instant,
    ) -> Result<(Vec<String>, Vec<PathBuf>), NixError> {
        let mut args = self.base_args();
        // Nix's own "last N log lines" of a failed builder: as many as we keep.
        args.extend([
            "--option".into(),
            "log-lines".into(),
            self.config.stderr_lines.to_string().into(),
        ]);
        args.push("--realise".into());
        if let Some(root) = gc_root {
            args.extend(["--add-root".into(), root.as_os_str().to_owned()]);
        }
        for p in &evaluation.packages {
            // `drv!out1,out2`: only the outputs that go into the image, so
            // nothing else (dev, doc) is substituted.
            let outs: Vec<&str> = p.outputs.iter().map(|o| o.name.as_str()).collect();
            args.push(format!("{}!{}", p.drv_path, outs.join(",")).into());
        }
        let out = self.run("nix-store", args, deadline, Step::Build)?;
        let stdout = match self.expect_success(out, Step::Build) {
            Err(NixError::BuildFailed { stderr_tail, .. }) if is_platform_error(&stderr_tail) => {
                return Err(NixError::UnsupportedSystem {
                    system: evaluation.system.clone(),
                    stderr_tail,
                })
            }
            other => other?,
        };
        let text = String::from_utf8_lossy(&stdout);
        let mut realised = Vec::new();
        let mut links = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if gc_root.is_some() {
                // With --add-root Nix prints the links it made.
                let link = PathBuf::from(line);
                let target = std::fs::read_link(&link).map_err(|e| NixError::BadOutput {
                    step: Step::Build,
                    detail: format!("GC root {line} is not a link: {e}"),
                })?;
                realised.push(target.to_string_lossy().into_owned());
                links.push(link);
            } else {
                realised.push(line.to_owned());
            }
        }
        // Prefer the evaluated paths (in package order); they are what was
        // asked for. Content-addressed outputs are only known afterwards,
        // so fall back to what Nix printed.
        let expected = evaluation.output_paths();
        let roots = if expected.iter().all(|p| realised.contains(p)) {
            expected
        } else {
            let mut r = realised;
            r.dedup();
            r
        };
        Ok((roots, links))
    }

    /// The runtime closure of `roots` with sizes and references: two calls,
    /// `nix-store --query --requisites` and `nix-store --dump-db`.
    pub fn closure(&self, roots: &[String]) -> Result<ClosureGraph, NixError> {
        self.closure_until(roots, Instant::now() + self.config.timeout)
    }

    fn closure_until(&self, roots: &[String], deadline: Instant) -> Result<ClosureGraph, NixError> {
        let mut requisites = BTreeSet::new();
        for chunk in roots.chunks(ARGS_PER_CALL) {
            let mut args = self.base_args();
            args.extend(["--query".into(), "--requisites".into()]);
            args.extend(chunk.iter().map(OsString::from));
            let out = self.run("nix-store", args, deadline, Step::Query)?;
            let stdout = self.expect_success(out, Step::Query)?;
            requisites.extend(
                String::from_utf8_lossy(&stdout)
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned),
            );
        }
        let requisites: Vec<String> = requisites.into_iter().collect();
        let mut paths = BTreeMap::new();
        for chunk in requisites.chunks(ARGS_PER_CALL) {
            let mut args = self.base_args();
            args.push("--dump-db".into());
            args.extend(chunk.iter().map(OsString::from));
            let out = self.run("nix-store", args, deadline, Step::Query)?;
            let stdout = self.expect_success(out, Step::Query)?;
            let parsed = ClosureGraph::parse_dump_db(&String::from_utf8_lossy(&stdout)).map_err(
                |detail| NixError::BadOutput {
                    step: Step::Query,
                    detail,
                },
            )?;
            paths.extend(parsed);
        }
        for p in &requisites {
            if !paths.contains_key(p) {
                return Err(NixError::BadOutput {
                    step: Step::Query,
                    detail: format!("no registration for {p}"),
                });
            }
        }
        let mut seen = BTreeSet::new();
        let roots = roots
            .iter()
            .filter(|r| seen.insert(r.as_str()))
            .cloned()
            .collect();
        Ok(ClosureGraph { roots, paths })
    }

    /// Every valid path of the store with its references (`nix-store
    /// --dump-db`), e.g. to learn popularity from the local store's
    /// reference graph. `roots` is empty. Costs a second or so per 10,000
    /// paths.
    pub fn store_graph(&self) -> Result<ClosureGraph, NixError> {
        let deadline = Instant::now() + self.config.timeout;
        self.init_store_once(deadline);
        let mut args = self.base_args();
        args.push("--dump-db".into());
        let out = self.run("nix-store", args, deadline, Step::Query)?;
        let stdout = self.expect_success(out, Step::Query)?;
        let paths =
            ClosureGraph::parse_dump_db(&String::from_utf8_lossy(&stdout)).map_err(|detail| {
                NixError::BadOutput {
                    step: Step::Query,
                    detail,
                }
            })?;
        Ok(ClosureGraph {
            roots: Vec::new(),
            paths,
        })
    }

    /// Makes `link` a GC root for `store_path` (`nix-store --add-root`), so
    /// a cached image's closure survives `nix-collect-garbage`. Removing
    /// the link releases it.
    pub fn add_gc_root(&self, link: &Path, store_path: &str) -> Result<(), NixError> {
        let mut args = self.base_args();
        args.extend([
            "--add-root".into(),
            link.as_os_str().to_owned(),
            "--realise".into(),
            store_path.into(),
        ]);
        let deadline = Instant::now() + self.config.timeout;
        let out = self.run("nix-store", args, deadline, Step::GcRoot)?;
        self.expect_success(out, Step::GcRoot).map(drop)
    }

    fn expect_success(&self, out: Finished, step: Step) -> Result<Vec<u8>, NixError> {
        if out.status.success() {
            return Ok(out.stdout);
        }
        let status = out.status.to_string();
        let stderr_tail = out.stderr_tail;
        Err(match step {
            Step::Evaluate if stderr_tail.contains("was not found in the Nix search path") => {
                NixError::NoPackageSource
            }
            Step::Evaluate => NixError::EvalFailed {
                status,
                stderr_tail,
            },
            Step::Build => NixError::BuildFailed {
                status,
                stderr_tail,
            },
            step => NixError::CommandFailed {
                step,
                status,
                stderr_tail,
            },
        })
    }

    /// Runs one Nix command in its own process group with stdin closed,
    /// collecting stdout and the last [`NixConfig::stderr_lines`] lines of
    /// stderr (each line also goes to the debug log, as progress). Past
    /// `deadline` the group gets SIGTERM (Nix then stops its builders),
    /// then SIGKILL.
    fn run(
        &self,
        program: &str,
        args: Vec<OsString>,
        deadline: Instant,
        step: Step,
    ) -> Result<Finished, NixError> {
        let path = self.program(program);
        let started = Instant::now();
        let mut child = Command::new(&path)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|source| {
                let program = path.display().to_string();
                if source.kind() == io::ErrorKind::NotFound {
                    NixError::NotInstalled { program, source }
                } else {
                    NixError::Io { program, source }
                }
            })?;
        tracing::debug!(program, %step, "started Nix");

        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let keep = self.config.stderr_lines.max(1);
        let out_reader = thread::spawn(move || -> io::Result<Vec<u8>> {
            let mut buf = Vec::new();
            if let Some(s) = stdout {
                s.take(MAX_STDOUT as u64 + 1).read_to_end(&mut buf)?;
            }
            Ok(buf)
        });
        let err_reader = thread::spawn(move || tail_lines(stderr, keep));

        let status = wait_until(&mut child, deadline);
        let stderr_tail = err_reader.join().unwrap_or_default();
        let stdout = out_reader.join();
        let status = match status {
            Ok(Some(status)) => status,
            Ok(None) => {
                return Err(NixError::Timeout {
                    step,
                    after: started.elapsed(),
                    stderr_tail,
                })
            }
            Err(source) => {
                return Err(NixError::Io {
                    program: path.display().to_string(),
                    source,
                })
            }
        };
        let stdout = match stdout {
            Ok(Ok(buf)) if buf.len() <= MAX_STDOUT => buf,
            Ok(Ok(_)) => {
                return Err(NixError::BadOutput {
                    step,
                    detail: format!("more than {MAX_STDOUT} bytes on stdout"),
                })
            }
            Ok(Err(source)) => {
                return Err(NixError::Io {
                    program: path.display().to_string(),
                    source,
                })
            }
            Err(_) => {
                return Err(NixError::Io {
                    program: path.display().to_string(),
                    source: io::Error::other("stdout reader panicked"),
                })
            }
        };
        tracing::debug!(program, %step, elapsed_ms = started.elapsed().as_millis() as u64, %status, "Nix finished");
        Ok(Finished {
            status,
            stdout,
            stderr_tail,
        })
    }
}

fn is_platform_error(stderr: &str) -> bool {
    stderr.contains("is required to build") && stderr.contains("but I am a")
}

/// Waits for `child` until `deadline`. `Ok(None)`: it was killed for
/// running too long (and has been reaped).
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    // Polling keeps ownership of `child` here, so the pid cannot be reaped
    // and reused behind our back before we signal it.
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    signal_group(child, libc::SIGTERM);
    let grace = Instant::now() + KILL_GRACE;
    while Instant::now() < grace {
        if child.try_wait()?.is_some() {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
    signal_group(child, libc::SIGKILL);
    child.wait()?;
    Ok(None)
}

fn signal_group(child: &Child, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions. The child is
        // unreaped (we own it and have not seen it exit), so its pid, which
        // is also its process group id (process_group(0)), is still ours.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

/// Reads `stream` to the end, logging each line and returning the last
/// `keep` non-empty lines with terminal escapes removed.
fn tail_lines(stream: Option<impl Read>, keep: usize) -> String {
    let Some(stream) = stream else {
        return String::new();
    };
    let mut reader = BufReader::new(stream);
    let mut tail: VecDeque<String> = VecDeque::with_capacity(keep + 1);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        // A runaway line must not eat memory: keep its start.
        line.truncate(4096);
        let text = strip_ansi(&String::from_utf8_lossy(&line));
        let text = text.trim_end();
        if text.trim().is_empty() {
            continue;
        }
        tracing::debug!(target: "nixery_local::sources::nix::runner::stderr", "{text}");
        if tail.len() == keep {
            tail.pop_front();
        }
        tail.push_back(text.to_owned());
    }
    Vec::from(tail).join("\n")
}

/// Removes ANSI escape sequences (Nix colours some messages).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // CSI: parameters and intermediates, then one final byte.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &ImageName) -> Vec<&str> {
        n.packages().iter().map(AttrPath::as_str).collect()
    }

    #[test]
    fn names_are_sorted_and_deduplicated() {
        let a = ImageName::parse("htop/git/htop").expect("valid");
        let b = ImageName::parse("git/htop").expect("valid");
        assert_eq!(a, b);
        assert_eq!(names(&a), ["git", "htop"]);
        assert_eq!(a.canonical(), "git/htop");
        assert_eq!(a.system(), None);
        assert_eq!(a.cmd(), None);
    }

    #[test]
    fn meta_packages_expand_and_set_flags() {
        let n = ImageName::parse("arm64/shell/git").expect("valid");
        assert_eq!(
            names(&n),
            ["bashInteractive", "coreutils", "git", "moreutils", "nano"]
        );
        assert_eq!(n.system(), Some("aarch64-linux"));
        assert_eq!(n.cmd(), Some(vec!["bash".to_owned()]));
        assert_eq!(
            n.canonical(),
            "arm64/shell/bashInteractive/coreutils/git/moreutils/nano"
        );
        // Order of meta-packages does not matter either.
        assert_eq!(n, ImageName::parse("git/shell/arm64").expect("valid"));
        assert_eq!(ImageName::parse("arm64"), Err(ImageNameError::NoPackages));
        assert_eq!(names(&ImageName::parse("shell").expect("valid")).len(), 4);
    }

    #[test]
    fn attribute_paths_and_digit_prefix() {
        let n = ImageName::parse("python3packages.requests/1password/haskellPackages.foo")
            .expect("valid");
        assert_eq!(
            names(&n),
            [
                "_1password",
                "haskellPackages.foo",
                "python3packages.requests"
            ]
        );
        let p = AttrPath::parse("python3Packages.3to2").expect("valid");
        assert_eq!(
            p.segments().collect::<Vec<_>>(),
            ["python3Packages", "3to2"]
        );
        assert_eq!(
            AttrPath::parse("iana-etc").expect("valid").as_str(),
            "iana-etc"
        );
        assert_eq!(
            AttrPath::parse("_1password").expect("valid").as_str(),
            "_1password"
        );
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            "",
            "/",
            "git//htop",
            "git/",
            ".git",
            "git.",
            "a..b",
            "-rf",
            "'x",
            "a\"b",
            "a;b",
            "${builtins.exec}",
            "a b",
            "pkgs.x)",
            "../etc",
            "é",
            "a\\b",
            "with import <nixpkgs> {}; x",
        ] {
            assert!(ImageName::parse(bad).is_err(), "{bad:?} should be refused");
        }
        let long = "a".repeat(MAX_COMPONENT_LEN + 1);
        assert!(matches!(
            ImageName::parse(&long),
            Err(ImageNameError::ComponentTooLong { .. })
        ));
        let deep = ["a"; MAX_SEGMENTS + 1].join(".");
        assert!(ImageName::parse(&deep).is_err());
        let many = vec!["a"; MAX_COMPONENTS + 1].join("/");
        assert!(matches!(
            ImageName::parse(&many),
            Err(ImageNameError::TooManyComponents { .. })
        ));
    }

    #[test]
    fn git_tags_pick_rev_ref_or_default_branch() {
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            PkgSource::git_for_tag("https://x/y", commit),
            PkgSource::Git {
                url: "https://x/y".into(),
                rev: Some(commit.into()),
                git_ref: None
            }
        );
        assert!(PkgSource::git_for_tag("u", commit).is_pinned());
        assert_eq!(
            PkgSource::git_for_tag("u", "latest"),
            PkgSource::Git {
                url: "u".into(),
                rev: None,
                git_ref: None
            }
        );
        let branch = PkgSource::git_for_tag("u", "nixos-24.05");
        assert!(!branch.is_pinned());
        assert_eq!(
            serde_json::to_string(&branch).expect("json"),
            r#"{"type":"git","url":"u","rev":null,"ref":"nixos-24.05"}"#
        );
        assert_eq!(
            serde_json::to_string(&PkgSource::NixPath).expect("json"),
            r#"{"type":"nixpath"}"#
        );
    }

    #[test]
    fn sources_are_validated() {
        let ok = [
            PkgSource::Path {
                path: "/srv/pkgs".into(),
            },
            PkgSource::Channel {
                channel: "nixos-24.05".into(),
            },
            PkgSource::NixPath,
        ];
        for s in ok {
            assert!(s.validate().is_ok(), "{s:?}");
        }
        let bad = [
            PkgSource::Path {
                path: "pkgs".into(),
            },
            PkgSource::Channel {
                channel: "../../x".into(),
            },
            PkgSource::Channel {
                channel: "a/b".into(),
            },
            PkgSource::Git {
                url: String::new(),
                rev: None,
                git_ref: None,
            },
        ];
        for s in bad {
            assert!(
                matches!(s.validate(), Err(NixError::InvalidSource(_))),
                "{s:?}"
            );
        }
    }

    #[test]
    fn parses_dump_db() {
        let text = "/nix/store/aaa-a\n\
            0f00\n\
            120\n\
            /nix/store/xxx-a.drv\n\
            2\n\
            /nix/store/aaa-a\n\
            /nix/store/bbb-b\n\
            /nix/store/bbb-b\n\
            0e00\n\
            7\n\
            \n\
            0\n";
        let paths = ClosureGraph::parse_dump_db(text).expect("parses");
        assert_eq!(paths.len(), 2);
        let a = &paths["/nix/store/aaa-a"];
        assert_eq!(a.nar_size, 120);
        assert_eq!(a.nar_hash, "sha256:0f00");
        assert_eq!(a.references, ["/nix/store/bbb-b"]);
        assert!(paths["/nix/store/bbb-b"].references.is_empty());
        assert!(ClosureGraph::parse_dump_db("/nix/store/aaa-a\nff\n").is_err());
        assert!(ClosureGraph::parse_dump_db("/nix/store/aaa-a\nff\nx\n\n0\n").is_err());
    }

    #[test]
    fn stderr_tail_keeps_last_lines_without_escapes() {
        let input = "one\n\n\u{1b}[31;1merror:\u{1b}[0m two\nthree\nfour";
        assert_eq!(
            tail_lines(Some(input.as_bytes()), 3),
            "error: two\nthree\nfour"
        );
        assert_eq!(tail_lines(Some(input.as_bytes()), 1), "four");
    }

    // --- Against the real Nix and tests/pkgs ------------------------------

    fn test_nix(timeout: Duration) -> Nix {
        Nix::new(NixConfig {
            timeout,
            // Offline machine: do not wait for cache.nixos.org.
            options: vec![("substituters".into(), String::new())],
            ..NixConfig::default()
        })
    }

    fn test_pkgs() -> PkgSource {
        PkgSource::Path {
            path: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pkgs"),
        }
    }

    #[test]
    fn nix_is_installed() {
        let v = test_nix(Duration::from_secs(30))
            .version()
            .expect("nix-store must be installed (apt-get install nix-bin)");
        assert!(v.contains("Nix"), "{v}");
    }

    #[test]
    fn builds_hello_and_its_closure() {
        let nix = test_nix(Duration::from_secs(120));
        let name = ImageName::parse("hello").expect("valid");
        let built = nix.build(&test_pkgs(), &name, None).expect("hello builds");
        let ev = &built.evaluation;
        assert_eq!(ev.system, format!("{}-linux", std::env::consts::ARCH));
        let attrs: Vec<&str> = ev.packages.iter().map(|p| p.attr.as_str()).collect();
        // cacert and iana-etc come in as optional packages.
        assert_eq!(attrs, ["hello", "cacert", "iana-etc"]);
        assert!(!ev.packages[0].optional && ev.packages[1].optional);
        let hello = &ev.packages[0].outputs[0];
        assert_eq!(hello.name, "out");
        assert!(hello.path.ends_with("-hello-1.0"), "{}", hello.path);
        assert_eq!(built.closure.roots, ev.output_paths());

        // hello -> busybox, a real reference found by Nix's scanner.
        let info = &built.closure.paths[&hello.path];
        assert_eq!(info.references.len(), 1);
        assert!(info.references[0].ends_with("-busybox"));
        assert!(built.closure.paths[&info.references[0]].nar_size > 1_000_000);
        assert_eq!(built.closure.len(), 4);

        let script =
            std::fs::read_to_string(format!("{}/bin/hello", hello.path)).expect("hello script");
        assert!(script.contains("Hello from nix"));
        let out = Command::new(format!("{}/bin/hello", hello.path))
            .output()
            .expect("runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello from nix\n");
    }

    #[test]
    fn resolves_camel_case_nested_and_digit_names() {
        let nix = Nix::new(NixConfig {
            always_include: Vec::new(),
            ..test_nix(Duration::from_secs(120)).config().clone()
        });
        let name = ImageName::parse("python3packages.requests/haskellpackages.foo/1password/bashinteractive/bashInteractive")
            .expect("valid");
        let ev = nix.evaluate(&test_pkgs(), &name).expect("resolves");
        let attrs: Vec<(&str, &str)> = ev
            .packages
            .iter()
            .map(|p| (p.request.as_str(), p.attr.as_str()))
            .collect();
        assert_eq!(
            attrs,
            [
                ("_1password", "_1password"),
                ("bashInteractive", "bashInteractive"),
                ("haskellpackages.foo", "haskellPackages.foo"),
                ("python3packages.requests", "python3Packages.requests"),
            ]
        );
    }

    #[test]
    fn reports_every_missing_name() {
        let nix = test_nix(Duration::from_secs(120));
        let name = ImageName::parse("hello/nope/python3Packages.nope/hello.x/python3Packages")
            .expect("valid");
        match nix.evaluate(&test_pkgs(), &name) {
            Err(NixError::MissingPackages {
                missing,
                not_packages,
            }) => {
                assert_eq!(missing, ["hello.x", "nope", "python3Packages.nope"]);
                assert_eq!(not_packages, ["python3Packages"]);
            }
            other => panic!("expected MissingPackages, got {other:?}"),
        }
    }

    #[test]
    fn build_failures_carry_the_log_tail() {
        let nix = test_nix(Duration::from_secs(120));
        let err = nix
            .build(
                &test_pkgs(),
                &ImageName::parse("broken").expect("valid"),
                None,
            )
            .expect_err("broken fails");
        assert!(matches!(err, NixError::BuildFailed { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("this is the useful tail"), "{msg}");
    }

    #[test]
    fn arm64_on_this_host_is_a_clear_error() {
        if std::env::consts::ARCH == "aarch64" {
            return;
        }
        let nix = test_nix(Duration::from_secs(120));
        let err = nix
            .build(
                &test_pkgs(),
                &ImageName::parse("arm64/hello").expect("valid"),
                None,
            )
            .expect_err("cannot build aarch64 here");
        assert!(
            matches!(&err, NixError::UnsupportedSystem { system, .. } if system == "aarch64-linux"),
            "{err:?}"
        );
    }

    #[test]
    fn evaluation_errors_carry_the_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("default.nix");
        std::fs::write(
            &file,
            "{ ... }: { hello = throw \"custom failure marker\"; }",
        )
        .expect("write");
        let nix = test_nix(Duration::from_secs(60));
        let err = nix
            .evaluate(
                &PkgSource::Path { path: file },
                &ImageName::parse("hello").expect("valid"),
            )
            .expect_err("throws");
        assert!(matches!(err, NixError::EvalFailed { .. }), "{err:?}");
        assert!(err.to_string().contains("custom failure marker"), "{err}");
    }

    #[test]
    fn missing_nixpkgs_is_a_configuration_error() {
        let nix = test_nix(Duration::from_secs(60));
        let name = ImageName::parse("hello").expect("valid");
        let mut cfg = nix.config().clone();
        cfg.options.push(("nix-path".into(), String::new()));
        let err = Nix::new(cfg)
            .evaluate(&PkgSource::NixPath, &name)
            .expect_err("no <nixpkgs>");
        assert!(matches!(err, NixError::NoPackageSource), "{err:?}");
    }

    #[test]
    fn timeouts_kill_the_build() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("default.nix");
        // A fresh derivation each run, so nothing is cached.
        let nonce = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let pkgs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pkgs");
        std::fs::write(
            &file,
            format!(
                "{{ ... }}: {{ slow = (import {} {{}}).slow {{ nonce = \"{nonce}\"; }}; }}",
                pkgs.display()
            ),
        )
        .expect("write");
        let nix = test_nix(Duration::from_secs(3));
        let started = Instant::now();
        let err = nix
            .build(
                &PkgSource::Path { path: file },
                &ImageName::parse("slow").expect("valid"),
                None,
            )
            .expect_err("times out");
        assert!(
            matches!(
                err,
                NixError::Timeout {
                    step: Step::Build,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3) + KILL_GRACE + Duration::from_secs(2));
        assert!(err.to_string().contains("slow-"), "{err}");
    }

    #[test]
    fn gc_roots_are_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nix = test_nix(Duration::from_secs(120));
        let root = dir.path().join("root");
        let built = nix
            .build(
                &test_pkgs(),
                &ImageName::parse("greet").expect("valid"),
                Some(&root),
            )
            .expect("builds");
        assert_eq!(built.gc_roots.len(), built.evaluation.packages.len());
        assert_eq!(built.gc_roots[0], root);
        let target = std::fs::read_link(&root).expect("link");
        assert!(built
            .closure
            .roots
            .contains(&target.to_string_lossy().into_owned()));
        // greet -> hello, libfoo, busybox; plus cacert and iana-etc.
        assert_eq!(built.closure.len(), 6);

        let store = nix.store_graph().expect("whole store");
        for (path, info) in &built.closure.paths {
            assert_eq!(store.paths.get(path), Some(info));
        }
    }

    #[test]
    fn flake_sources_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pkgs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pkgs");
        std::fs::write(
            dir.path().join("flake.nix"),
            format!(
                "{{ outputs = {{ self }}: {{ legacyPackages.{}-linux = import {} {{ }}; }}; }}",
                std::env::consts::ARCH,
                pkgs.display()
            ),
        )
        .expect("write");
        let source = PkgSource::Flake {
            flake: format!("path:{}", dir.path().display()),
        };
        let ev = test_nix(Duration::from_secs(120))
            .evaluate(&source, &ImageName::parse("hello").expect("valid"))
            .expect("flake evaluates");
        assert_eq!(ev.packages[0].attr, "hello");
    }

    #[test]
    fn git_sources_pin_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path();
        let pkgs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pkgs");
        let git = |args: &[&str]| {
            let out = Command::new("git")
                .args([
                    "-c",
                    "user.name=t",
                    "-c",
                    "user.email=t@t",
                    "-c",
                    "init.defaultBranch=main",
                ])
                .args(args)
                .current_dir(repo)
                .output()
                .expect("git runs");
            assert!(out.status.success(), "git {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let write = |attr: &str| {
            std::fs::write(
                repo.join("default.nix"),
                format!(
                    "args: {{ {attr} = (import {} args).hello; }}",
                    pkgs.display()
                ),
            )
            .expect("write");
        };
        git(&["init", "-q"]);
        write("first");
        git(&["add", "default.nix"]);
        git(&["commit", "-q", "-m", "one"]);
        let first = git(&["rev-parse", "HEAD"]);
        write("second");
        git(&["commit", "-q", "-am", "two"]);

        let nix = test_nix(Duration::from_secs(120));
        let url = format!("file://{}", repo.display());
        let pinned = PkgSource::git_for_tag(&url, &first);
        assert!(pinned.is_pinned());
        let name = |n: &str| ImageName::parse(n).expect("valid");
        nix.evaluate(&pinned, &name("first"))
            .expect("first at the pinned commit");
        assert!(matches!(
            nix.evaluate(&pinned, &name("second")),
            Err(NixError::MissingPackages { .. })
        ));
        let latest = PkgSource::git_for_tag(&url, "latest");
        nix.evaluate(&latest, &name("second"))
            .expect("second on the default branch");
        let branch = PkgSource::git_for_tag(&url, "main");
        nix.evaluate(&branch, &name("second"))
            .expect("second on main");
    }

    #[test]
    fn missing_nix_is_reported_as_such() {
        let nix = Nix::new(NixConfig {
            bin_dir: Some(PathBuf::from("/nonexistent/nix/bin")),
            ..NixConfig::default()
        });
        assert!(matches!(nix.version(), Err(NixError::NotInstalled { .. })));
    }
}
