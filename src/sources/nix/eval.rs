//! Evaluation: resolving an image name's packages to derivations.
//!
//! Names never reach Nix as code. One constant expression ([`REQUEST_EXPR`])
//! takes the request as JSON through `--argstr request` and resolves every
//! attribute path with `hasAttr`/`getAttr`, so a hostile name is at worst a
//! missing attribute. [`Nix::evaluate`] runs it and returns an
//! [`Evaluation`]; missing names are all reported at once.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::sources::nix::command::Nix;
use crate::sources::nix::error::{NixError, Step};
use crate::sources::nix::name::ImageName;
use crate::sources::nix::pkgset::PkgSource;

/// The only Nix code this daemon runs. It is a constant: the request (source,
/// system, package attribute paths split into segments) arrives as JSON via
/// `--argstr request`, and every lookup is `hasAttr`/`getAttr` on data.
///
/// Lookups per segment: exact name; for a segment starting with a digit,
/// `_` + name; at the top level only, the attribute whose lowercased name
/// equals the (lowercase) segment (registry names cannot carry uppercase).
/// The result is JSON: `{ system; sourceDate; missing; notPackages;
/// packages }` (`sourceDate`: the commit time of a git or flake source, the
/// one date that belongs to the inputs), or
/// `{ error = "no-nixpkgs"; }` when `<nixpkgs>` was asked for and is not in
/// the search path.
pub(crate) const REQUEST_EXPR: &str = r#"
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
  gitSrc = builtins.fetchGit gitArgs;
  flake = builtins.getFlake src.flake;
  sourceDate =
    if src.type == "git" then gitSrc.lastModified or null
    else if src.type == "flake" then flake.lastModified or null
    else null;
  pkgs =
    if src.type == "path" then load (/. + src.path)
    else if src.type == "channel" then
      load (builtins.fetchTarball "https://channels.nixos.org/${src.channel}/nixexprs.tar.xz")
    else if src.type == "git" then load gitSrc
    else if src.type == "flake" then flake.legacyPackages.${system}
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
  inherit system sourceDate;
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
    source_date: Option<u64>,
    #[serde(default)]
    missing: Vec<String>,
    #[serde(default)]
    not_packages: Vec<String>,
    #[serde(default)]
    packages: Vec<ResolvedPackage>,
}

/// One output of a resolved package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PackageOutput {
    pub(crate) name: String,
    pub(crate) path: String,
}

/// A requested package as Nix resolved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ResolvedPackage {
    /// The attribute path as requested (`python3packages.requests`).
    pub(crate) request: String,
    /// The attribute path that matched (`python3Packages.requests`).
    pub(crate) attr: String,
    /// The derivation's `name` (`python3.11-requests-2.31.0`).
    pub(crate) name: String,
    pub(crate) drv_path: String,
    /// `meta.outputsToInstall` (what `nix-env` would install), else the
    /// default output.
    pub(crate) outputs: Vec<PackageOutput>,
    #[serde(default)]
    pub(crate) main_program: Option<String>,
    /// Added by
    /// [`NixConfig::always_include`](crate::sources::nix::command::NixConfig::always_include),
    /// not by the name.
    #[serde(default)]
    pub(crate) optional: bool,
}

/// What evaluation found for an image name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Evaluation {
    /// The Nix system the packages are built for (`x86_64-linux`).
    pub(crate) system: String,
    /// When the package set was committed (git and flake sources), in
    /// seconds since the epoch.
    pub(crate) source_date: Option<u64>,
    /// Requested packages first (in name order), then optional ones;
    /// duplicates (two names for one derivation) removed.
    pub(crate) packages: Vec<ResolvedPackage>,
}

impl Evaluation {
    /// Every output path of every package, in package order.
    pub(crate) fn output_paths(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        self.packages
            .iter()
            .flat_map(|p| p.outputs.iter())
            .filter(|o| seen.insert(o.path.clone()))
            .map(|o| o.path.clone())
            .collect()
    }
}

impl Nix {
    /// Resolves the packages of `name` (and
    /// [`NixConfig::always_include`](crate::sources::nix::command::NixConfig::always_include))
    /// and instantiates their derivations, without building anything.
    /// Missing names are all reported at once.
    #[cfg(test)]
    pub(crate) fn evaluate(
        &self,
        source: &PkgSource,
        name: &ImageName,
    ) -> Result<Evaluation, NixError> {
        let deadline = Instant::now() + self.config().timeout;
        self.init_store_once(deadline);
        self.evaluate_until(source, name, deadline)
    }

    pub(super) fn evaluate_until(
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
        for extra in &self.config().always_include {
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
            source_date: parsed.source_date,
            packages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::sources::nix::command::NixConfig;
    use crate::sources::nix::runner::tests::{test_nix, test_pkgs};

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
}
