//! Packaging: the Debian package (`packaging/build-deb.sh`) builds, installs
//! with `dpkg -i` on this machine, leaves a working binary, user, config and
//! units, and goes away with `dpkg -r`/`dpkg -P`; the Nix expressions
//! (`nix/`) parse, and what can be evaluated without nixpkgs (the generated
//! config file and containerd `hosts.toml` files, the NixOS module's wiring
//! with a stub `lib`, the package's arguments) agrees with the daemon's CLI.
//!
//! The Debian test needs root and changes this machine's package database
//! (CI machines are throwaway). It packages the binary under test, so it
//! never runs cargo from inside cargo test.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lines of a config file that are not comments: what a client reads.
fn without_comments(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

// ---------------------------------------------------------------------------
// Debian package
// ---------------------------------------------------------------------------

/// `dpkg ARGS` with a non-interactive frontend (5 min limit: dpkg waits for
/// nothing, but a slow disk is not a failure).
fn dpkg(args: &[&str]) -> Output {
    output_timeout(
        Command::new("dpkg")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        Duration::from_secs(300),
    )
}

fn dpkg_ok(args: &[&str]) -> String {
    let out = dpkg(args);
    assert_success(&format!("dpkg {}", args.join(" ")), &out);
    stdout(&out)
}

/// The package's dpkg status, e.g. "install ok installed"; None when dpkg
/// knows nothing of it.
fn package_status() -> Option<String> {
    let out = output_timeout(
        Command::new("dpkg-query").args(["-W", "-f=${Status}", PACKAGE]),
        Duration::from_secs(60),
    );
    let status = stdout(&out);
    (out.status.success() && !status.contains("not-installed")).then_some(status)
}

/// Purges the package when the test ends, also when it fails, so a rerun
/// starts from a clean machine.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = dpkg(&["--purge", PACKAGE]);
    }
}

/// Links `deb-systemd-helper enable` makes (and `purge` removes).
const ENABLE_LINKS: [&str; 2] = [
    "/etc/systemd/system/multi-user.target.wants/nixery-local.service",
    "/etc/systemd/system/sockets.target.wants/nixery-local.socket",
];

const INSTALLED_FILES: [(&str, &str); 4] = [
    (
        "systemd/nixery-local.service",
        "/lib/systemd/system/nixery-local.service",
    ),
    (
        "systemd/nixery-local.socket",
        "/lib/systemd/system/nixery-local.socket",
    ),
    (
        "systemd/user/nixery-local.service",
        "/usr/lib/systemd/user/nixery-local.service",
    ),
    ("packaging/config.toml", "/etc/nixery-local/config.toml"),
];

fn exists(path: &str) -> bool {
    Path::new(path).symlink_metadata().is_ok()
}

/// What the package says about itself, before installing it.
fn check_deb_metadata(deb: &Path) {
    let field = |name: &str| {
        run_ok(
            "dpkg-deb --field",
            Command::new("dpkg-deb").arg("--field").arg(deb).arg(name),
            Duration::from_secs(30),
        )
        .trim()
        .to_owned()
    };
    assert_eq!(field("Package"), PACKAGE);
    assert_eq!(field("Version"), VERSION);
    let depends = field("Depends");
    assert!(depends.starts_with("adduser, libc6"), "Depends: {depends}");
    assert_eq!(
        field("Recommends"),
        "nix-bin, nix-setup-systemd, containerd"
    );
    assert!(!field("Description").is_empty());

    let info = run_ok(
        "dpkg-deb --info",
        Command::new("dpkg-deb").arg("--info").arg(deb),
        Duration::from_secs(30),
    );
    // `*` marks an executable control member.
    for script in ["postinst", "prerm", "postrm"] {
        assert!(
            info.lines()
                .any(|l| l.contains(" * ") && l.contains(&format!(" {script} "))),
            "{script} missing or not executable:\n{info}"
        );
    }
    let conffiles = run_ok(
        "dpkg-deb --info DEB conffiles",
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(deb)
            .arg("conffiles"),
        Duration::from_secs(30),
    );
    assert_eq!(conffiles, "/etc/nixery-local/config.toml\n");

    // `-rwxr-xr-x root/root 123 2024-01-01 00:00 ./usr/bin/nixery-local`
    let contents = run_ok(
        "dpkg-deb --contents",
        Command::new("dpkg-deb").arg("--contents").arg(deb),
        Duration::from_secs(30),
    );
    let entries: BTreeMap<String, (String, String)> = contents
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f.last().expect("path").trim_start_matches('.').to_owned();
            (path, (f[0].to_owned(), f[1].to_owned()))
        })
        .collect();
    assert!(
        entries.values().all(|(_, owner)| owner == "root/root"),
        "{contents}"
    );
    let mut expected: Vec<(&str, &str)> = vec![
        ("/usr/bin/nixery-local", "-rwxr-xr-x"),
        ("/usr/share/doc/nixery-local/copyright", "-rw-r--r--"),
        ("/usr/share/doc/nixery-local/README.md.gz", "-rw-r--r--"),
    ];
    expected.extend(INSTALLED_FILES.iter().map(|(_, p)| (*p, "-rw-r--r--")));
    for (path, mode) in expected {
        match entries.get(path) {
            Some((m, _)) => assert_eq!(m, mode, "{path}"),
            None => panic!("{path} is not in the package:\n{contents}"),
        }
    }
}

#[test]
fn debian_package_builds_installs_removes_and_purges() {
    // SAFETY: getuid has no preconditions.
    assert_eq!(
        unsafe { libc::getuid() },
        0,
        "the Debian package test installs a package: run as root (sudo tests/run.sh)"
    );
    for (tool, package) in [
        ("dpkg-deb", "dpkg"),
        ("strip", "binutils"),
        ("adduser", "adduser"),
        ("deb-systemd-helper", "init-system-helpers"),
        ("systemd-analyze", "systemd"),
    ] {
        require_from(tool, package);
    }

    let out_dir = tempdir("nl-deb");
    let deb = build_deb(out_dir.path());
    check_deb_metadata(&deb);

    // A rerun after a failed run starts clean; the guard cleans up after us.
    dpkg_ok(&["--purge", PACKAGE]);
    let _purge = Purge;
    dpkg_ok(&["--install", s(&deb)]);
    assert_eq!(package_status().as_deref(), Some("install ok installed"));

    // The binary.
    let version = run_ok(
        "nixery-local --version",
        Command::new("/usr/bin/nixery-local").arg("--version"),
        Duration::from_secs(30),
    );
    assert_eq!(version.trim(), format!("nixery-local {VERSION}"));

    // The files are the repository's.
    for (source, installed) in INSTALLED_FILES {
        assert_eq!(
            fs::read(installed).unwrap_or_else(|e| panic!("{installed}: {e}")),
            fs::read(repo().join(source)).expect("read repository file"),
            "{installed} differs from {source}"
        );
    }

    // The system user, in nix-users when Debian's Nix daemon is installed.
    let passwd = run_ok(
        "getent passwd nixery-local",
        Command::new("getent").args(["passwd", PACKAGE]),
        Duration::from_secs(30),
    );
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    let uid: u32 = fields[2].parse().expect("uid");
    assert!(uid < 1000, "not a system user: {passwd}");
    assert_eq!(fields[5], "/var/lib/nixery-local", "{passwd}");
    let groups = run_ok(
        "id -nG nixery-local",
        Command::new("id").args(["-nG", PACKAGE]),
        Duration::from_secs(30),
    );
    let groups: Vec<&str> = groups.split_whitespace().collect();
    assert!(groups.contains(&PACKAGE), "{groups:?}");
    let has_nix_users = output_timeout(
        Command::new("getent").args(["group", "nix-users"]),
        Duration::from_secs(30),
    )
    .status
    .success();
    assert_eq!(groups.contains(&"nix-users"), has_nix_users, "{groups:?}");

    // The config is the service's to read, and nobody else's.
    let config = "/etc/nixery-local/config.toml";
    let meta = fs::metadata(config).expect("stat config");
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert_eq!(meta.uid(), 0);
    let group = run_ok(
        "getent group nixery-local",
        Command::new("getent").args(["group", PACKAGE]),
        Duration::from_secs(30),
    );
    assert_eq!(
        group
            .split(':')
            .nth(2)
            .expect("gid")
            .parse::<u32>()
            .expect("gid"),
        meta.gid()
    );

    // It parses into complete settings, also when read by the service user.
    let hosts = tempdir("nl-deb-hosts");
    fs::set_permissions(hosts.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let setup = [
        "setup",
        "containerd",
        "--config",
        config,
        "--dry-run",
        "--hosts-dir",
        s(hosts.path()),
    ];
    let out = run_ok(
        "nixery-local setup containerd --config /etc/nixery-local/config.toml",
        Command::new("/usr/bin/nixery-local").args(setup),
        Duration::from_secs(30),
    );
    assert!(out.contains("[host.\"http://127.0.0.1:7733\"]"), "{out}");
    run_ok(
        "setup --config as the service user",
        Command::new("runuser")
            .args(["-u", PACKAGE, "--", "/usr/bin/nixery-local"])
            .args(setup),
        Duration::from_secs(30),
    );

    // The installed units verify (ExecStart= names the installed binary).
    systemd_verify(
        false,
        &[
            "/lib/systemd/system/nixery-local.service",
            "/lib/systemd/system/nixery-local.socket",
        ],
    );
    systemd_verify(true, &["/usr/lib/systemd/user/nixery-local.service"]);
    // Enabled (the service's Also= brings the socket), even without a
    // running systemd; started only with one.
    for link in ENABLE_LINKS {
        assert!(exists(link), "{link} missing: not enabled");
    }
    if Path::new("/run/systemd/system").is_dir() {
        let out = output_timeout(
            Command::new("systemctl").args(["is-active", "nixery-local.socket"]),
            Duration::from_secs(30),
        );
        assert_eq!(stdout(&out).trim(), "active", "the socket was not started");
    }

    // Reinstalling keeps the admin's edits to the conffile.
    let mut edited = fs::read_to_string(config).expect("read config");
    edited.push_str("# edited by the packaging test\n");
    fs::write(config, &edited).expect("edit config");
    dpkg_ok(&["--install", s(&deb)]);
    assert_eq!(fs::read_to_string(config).expect("read config"), edited);

    // Remove: the program and units go, the config stays.
    dpkg_ok(&["--remove", PACKAGE]);
    assert_eq!(
        package_status().as_deref(),
        Some("deinstall ok config-files")
    );
    for path in ["/usr/bin/nixery-local"]
        .into_iter()
        .chain(INSTALLED_FILES[..3].iter().map(|(_, p)| *p))
    {
        assert!(!exists(path), "{path} left after dpkg --remove");
    }
    assert!(exists(config), "dpkg --remove must keep the conffile");

    // Purge: nothing of it is left but the system user.
    dpkg_ok(&["--purge", PACKAGE]);
    assert_eq!(package_status(), None);
    for path in ENABLE_LINKS.into_iter().chain([
        config,
        "/etc/nixery-local",
        "/etc/systemd/system/nixery-local.service",
        "/etc/systemd/system/nixery-local.socket",
        "/var/lib/nixery-local",
    ]) {
        assert!(!exists(path), "{path} left after dpkg --purge");
    }
    let overrides = run_ok(
        "dpkg-statoverride --list",
        Command::new("dpkg-statoverride").arg("--list"),
        Duration::from_secs(30),
    );
    assert!(!overrides.contains(config), "{overrides}");
}

// ---------------------------------------------------------------------------
// Nix
// ---------------------------------------------------------------------------

/// Every `.nix` file in the repository (not under target/ or .git/).
fn nix_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name == "target" || name == ".git" || name == "result" {
                continue;
            }
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                walk(&path, out);
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "nix") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(repo(), &mut files);
    files.sort();
    files
}

/// `nix-instantiate --eval --strict --json ARGS`, from the repository, as
/// parsed JSON. Evaluation only: nothing is built or written to the store.
fn nix_eval(args: &[&str]) -> Value {
    require("nix-instantiate");
    let out = output_timeout(
        Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json"])
            .args(args)
            .current_dir(repo()),
        Duration::from_secs(120),
    );
    assert_success(&format!("nix-instantiate --eval {}", args.join(" ")), &out);
    serde_json::from_slice(&out.stdout).expect("nix-instantiate printed JSON")
}

/// A Nix expression for a JSON value (Nix's own `fromJSON`).
fn nix_arg(value: &Value) -> String {
    let json = serde_json::to_string(value).expect("json");
    // A Nix indented string holds anything but `''` and `${`.
    assert!(!json.contains("''") && !json.contains("${"), "{json}");
    format!("builtins.fromJSON ''{json}''")
}

#[test]
fn every_nix_file_parses() {
    require("nix-instantiate");
    let files = nix_files();
    for wanted in [
        "nix/default.nix",
        "nix/package.nix",
        "nix/module.nix",
        "nix/toml.nix",
        "nix/hosts-toml.nix",
        "tests/pkgs/default.nix",
    ] {
        assert!(files.contains(&repo().join(wanted)), "{wanted} not found");
    }
    for file in files {
        run_ok(
            &format!("nix-instantiate --parse {}", file.display()),
            Command::new("nix-instantiate").arg("--parse").arg(&file),
            Duration::from_secs(60),
        );
    }
}

/// `setup containerd --dry-run ARGS` as `{host: content}`.
fn setup_dry_run(args: &[&str]) -> BTreeMap<String, String> {
    let out = run_ok(
        "setup containerd --dry-run",
        Command::new(bin())
            .args(["setup", "containerd", "--dry-run", "--hosts-dir", "/hosts"])
            .args(args),
        Duration::from_secs(30),
    );
    // "would create /hosts/HOST/hosts.toml:" then the content, up to the
    // next "would …" or the final "dry run: …".
    let mut files = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("would create /hosts/") {
            files.extend(current.take());
            let host = rest.strip_suffix("/hosts.toml:").expect("a hosts.toml");
            current = Some((host.to_owned(), String::new()));
        } else if line.starts_with("dry run:") {
            files.extend(current.take());
        } else if let Some((_, content)) = current.as_mut() {
            content.push_str(line);
            content.push('\n');
        }
    }
    assert!(current.is_none() && !files.is_empty(), "{out}");
    files
}

/// nix/hosts-toml.nix gives what `setup containerd` writes, but for the
/// header comment, for the same listen address and registries.
#[test]
fn nix_hosts_toml_matches_setup_containerd() {
    let registries = [
        "docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
        "localhost:5000",
    ];
    for listen in ["127.0.0.1:7733", "0.0.0.0:8080", "[::1]:7733", "[::]:7744"] {
        for all in [false, true] {
            let mut args = vec!["--listen", listen];
            if all {
                args.push("--all");
            } else {
                for r in registries {
                    args.extend(["--registry", r]);
                }
            }
            let cli = setup_dry_run(&args);
            let hosts: Vec<&String> = cli.keys().collect();
            let nix = nix_eval(&[
                "--arg",
                "hosts",
                &nix_arg(&json!(hosts)),
                "--argstr",
                "listen",
                listen,
                "-E",
                "{ hosts, listen }: builtins.listToAttrs (map (host: { name = host; \
                 value = import ./nix/hosts-toml.nix { inherit host listen; }; }) hosts)",
            ]);
            for (host, content) in &cli {
                let generated = nix[host].as_str().expect("a string");
                assert!(
                    generated.starts_with("# Managed by NixOS"),
                    "{host}: {generated}"
                );
                assert_eq!(
                    without_comments(generated),
                    without_comments(content),
                    "{host} with listen {listen}"
                );
            }
        }
    }
}

/// Settings as the module would be given them: every kind of value.
fn sample_settings(state_dir: &Path) -> Value {
    json!({
        "listen": "127.0.0.1:7744",
        "state-dir": s(state_dir),
        "default-registry": "ghcr.io",
        "layer-compression": "zstd",
        "upstream": ["registry.internal:5000=http://10.0.0.5:5000"],
        "offline": true,
        "tag-ttl": 30,
        "nix-option": ["substituters=", "max-jobs=2"],
        "header-timeout": null,
    })
}

/// nix/toml.nix writes a file that the toml crate reads back as the same
/// values, and that the daemon accepts as a complete config.
#[test]
fn nix_config_file_is_accepted_by_the_daemon() {
    let state = tempdir("nl-nix-state");
    let mut settings = sample_settings(state.path());
    // Strings that need escaping survive (as a key the daemon would refuse,
    // so only in the round trip).
    let mut tricky = settings.clone();
    tricky["odd key"] = json!("quote \" backslash \\ newline \n tab \t unicode é");
    let text = nix_eval(&[
        "--arg",
        "s",
        &nix_arg(&tricky),
        "-E",
        "{ s }: import ./nix/toml.nix s",
    ]);
    let text = text.as_str().expect("a string");
    let parsed: toml::Value = toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let parsed = serde_json::to_value(parsed).expect("json");
    tricky
        .as_object_mut()
        .expect("object")
        .remove("header-timeout");
    assert_eq!(parsed, tricky, "{text}");

    settings
        .as_object_mut()
        .expect("object")
        .remove("header-timeout");
    let text = nix_eval(&[
        "--arg",
        "s",
        &nix_arg(&settings),
        "-E",
        "{ s }: import ./nix/toml.nix s",
    ]);
    let dir = tempdir("nl-nix-config");
    let config = dir.path().join("config.toml");
    fs::write(&config, text.as_str().expect("a string")).expect("write config");
    let out = run_ok(
        "setup containerd --config (generated by nix/toml.nix)",
        Command::new(bin())
            .args([
                "setup",
                "containerd",
                "--dry-run",
                "--hosts-dir",
                "/hosts",
                "--config",
            ])
            .arg(&config),
        Duration::from_secs(30),
    );
    assert!(out.contains("[host.\"http://127.0.0.1:7744\"]"), "{out}");
}

/// The NixOS module, evaluated with a stub `lib` (nix/tests/eval-module.nix).
fn eval_module(settings: &Value, mirror: &Value, enable: bool) -> Value {
    nix_eval(&[
        "nix/tests/eval-module.nix",
        "--arg",
        "settings",
        &nix_arg(settings),
        "--arg",
        "containerdMirror",
        &nix_arg(mirror),
        "--arg",
        "enable",
        if enable { "true" } else { "false" },
    ])
}

#[test]
fn nixos_module_wires_the_shipped_units_config_and_containerd() {
    let state = tempdir("nl-nix-state");
    let settings = sample_settings(state.path());
    let registries = ["docker.io", "registry.internal:5000"];
    let module = eval_module(
        &settings,
        &json!({ "enable": true, "registries": registries }),
        true,
    );
    let stub = "/nix/store/00000000000000000000000000000000-nixery-local-stub";

    // A drop-in on the package's own units.
    assert_eq!(module["systemdPackages"], json!([stub]));
    assert_eq!(module["overrideStrategy"], "asDropin");
    assert_eq!(module["wantedBy"], json!(["multi-user.target"]));
    assert_eq!(module["socketWantedBy"], json!(["sockets.target"]));
    assert_eq!(module["wants"], json!(["nix-daemon.socket"]));
    assert_eq!(module["after"], json!(["nix-daemon.socket"]));
    assert_eq!(module["listenStream"], json!(["", "127.0.0.1:7744"]));
    assert_eq!(
        module["environment"]["NIX_PATH"],
        "nixpkgs=/nix/var/nix/profiles/per-user/root/channels/nixos:/etc/nix/path"
    );
    assert_eq!(module["user"]["isSystemUser"], true);
    assert_eq!(module["user"]["group"], PACKAGE);
    assert_eq!(module["groups"], json!([PACKAGE]));
    // ExecStart is reset, then the shipped command with the generated file.
    let exec = module["execStart"].as_array().expect("a list");
    assert_eq!(exec[0], "");
    let command = exec[1].as_str().expect("a string");
    let shipped = fs::read_to_string(repo().join("systemd/nixery-local.service")).expect("read");
    let shipped = shipped
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart=/usr/bin/nixery-local "))
        .expect("ExecStart");
    let shipped_args = shipped
        .strip_suffix("/etc/nixery-local/config.toml")
        .expect("--config last");
    let (binary, args) = command.split_once(' ').expect("arguments");
    assert_eq!(binary, format!("{stub}/bin/nixery-local"));
    let config_path = args.strip_prefix(shipped_args).expect(command);
    assert!(
        config_path.starts_with("/nix/store/") && config_path.ends_with("-nixery-local.toml"),
        "{command}"
    );

    // The generated file is the settings, and the daemon accepts it.
    let text = module["configText"].as_str().expect("a string");
    let mut expected = settings.clone();
    expected
        .as_object_mut()
        .expect("object")
        .remove("header-timeout");
    let parsed: toml::Value = toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(serde_json::to_value(parsed).expect("json"), expected);
    let dir = tempdir("nl-nix-config");
    let config = dir.path().join("config.toml");
    fs::write(&config, text).expect("write config");
    let mut args = vec!["--config", s(&config)];
    for r in registries {
        args.extend(["--registry", r]);
    }
    let cli = setup_dry_run(&args);

    // containerd: config_path, and the files setup writes for the same
    // registries (nix.local included).
    assert_eq!(module["containerdConfigPath"], "/etc/containerd/certs.d");
    let files = module["hostsFiles"].as_object().expect("an object");
    let nix: BTreeMap<String, String> = files
        .iter()
        .map(|(name, text)| {
            let host = name
                .strip_prefix("containerd/certs.d/")
                .and_then(|n| n.strip_suffix("/hosts.toml"))
                .unwrap_or_else(|| panic!("unexpected /etc file {name}"));
            (host.to_owned(), text.as_str().expect("text").to_owned())
        })
        .collect();
    assert_eq!(
        nix.keys().collect::<Vec<_>>(),
        cli.keys().collect::<Vec<_>>()
    );
    for (host, content) in &cli {
        assert_eq!(
            without_comments(&nix[host]),
            without_comments(content),
            "{host}"
        );
    }

    // `all`: one _default entry; more Nix registries: one entry each.
    let module = eval_module(
        &json!({ "nix-registry": ["nix.local", "nix.corp"] }),
        &json!({ "enable": true, "all": true }),
        true,
    );
    let mut hosts: Vec<&String> = module["hostsFiles"]
        .as_object()
        .expect("an object")
        .keys()
        .collect();
    hosts.sort();
    assert_eq!(
        hosts,
        [
            "containerd/certs.d/_default/hosts.toml",
            "containerd/certs.d/nix.corp/hosts.toml",
            "containerd/certs.d/nix.local/hosts.toml",
        ]
    );
    // A Nix registry's server is the daemon itself: no DNS lookup of it.
    assert!(
        module["hostsFiles"]["containerd/certs.d/nix.corp/hosts.toml"]
            .as_str()
            .expect("text")
            .contains("\nserver = \"http://127.0.0.1:7733\"\n")
    );
    // Defaults: loopback, the service's cache named for the CLI, and no
    // containerd files unless asked for.
    let module = eval_module(&json!({}), &json!({}), true);
    assert_eq!(module["listenStream"], json!(["", "127.0.0.1:7733"]));
    assert_eq!(
        module["configText"],
        "listen = \"127.0.0.1:7733\"\nstate-dir = \"/var/lib/nixery-local\"\n"
    );
    assert_eq!(module["hostsFiles"], json!({}));
    assert_eq!(module["containerdConfigPath"], Value::Null);
    // Disabled: no config at all.
    let module = eval_module(&json!({}), &json!({ "enable": true }), false);
    assert_eq!(module, json!({ "config": {} }));
}

/// nix/package.nix with a stub `lib` and `rustPlatform`: its name, version
/// and lock file are the crate's, and the files it installs exist.
#[test]
fn nix_package_matches_the_crate() {
    let args = nix_eval(&[
        "-E",
        r#"
        let
          lib = {
            importTOML = p: builtins.fromTOML (builtins.readFile p);
            fileset = {
              toSource = { root, fileset }: map toString fileset;
              unions = fs: fs;
              maybeMissing = p: p;
            };
            licenses = { mit = "mit"; asl20 = "asl20"; };
            platforms.linux = [ "x86_64-linux" ];
          };
          rustPlatform.buildRustPackage = args: args;
          a = import ./nix/package.nix { inherit lib rustPlatform; };
        in {
          inherit (a) pname version postInstall doCheck;
          src = a.src;
          lockFile = toString a.cargoLock.lockFile;
        }"#,
    ]);
    assert_eq!(args["pname"], PACKAGE);
    assert_eq!(args["version"], VERSION);
    assert_eq!(
        args["lockFile"].as_str().map(PathBuf::from),
        Some(repo().join("Cargo.lock"))
    );
    for path in args["src"].as_array().expect("a list") {
        let path = Path::new(path.as_str().expect("a path"));
        assert!(
            path.exists() || path.ends_with("build.rs"),
            "{} is in the source set but missing",
            path.display()
        );
    }
    let post_install = args["postInstall"].as_str().expect("a string");
    let mut installed = 0;
    for word in post_install.split_whitespace() {
        if word.starts_with("systemd/") || word.starts_with("packaging/") {
            assert!(repo().join(word).is_file(), "postInstall names {word}");
            installed += 1;
        }
    }
    assert_eq!(installed, INSTALLED_FILES.len(), "{post_install}");
}
