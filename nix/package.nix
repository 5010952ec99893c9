# The nixery-local daemon, with its systemd units in $out/lib/systemd (so it
# works in NixOS's systemd.packages) and the example config in
# $out/share/nixery-local. Needs a nixpkgs whose Rust is at least Cargo.toml's
# rust-version (1.85: nixos-25.05 or later).
{ lib, rustPlatform }:
let
  manifest = (lib.importTOML ../Cargo.toml).package;
in
rustPlatform.buildRustPackage {
  pname = manifest.name;
  inherit (manifest) version;

  # Only what the build reads, so edits to tests, docs or nix/ do not rebuild.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../systemd
      ../packaging/config.toml
      (lib.fileset.maybeMissing ../build.rs)
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  # The unit tests build Nix images with the host's Nix store and busybox,
  # and the end-to-end tests need containerd and root: tests/run.sh runs them.
  doCheck = false;

  postInstall = ''
    install -Dm0644 systemd/nixery-local.service $out/lib/systemd/system/nixery-local.service
    install -Dm0644 systemd/nixery-local.socket $out/lib/systemd/system/nixery-local.socket
    install -Dm0644 systemd/user/nixery-local.service $out/lib/systemd/user/nixery-local.service
    substituteInPlace $out/lib/systemd/system/nixery-local.service \
      $out/lib/systemd/user/nixery-local.service \
      --replace-fail /usr/bin/nixery-local $out/bin/nixery-local
    install -Dm0644 packaging/config.toml $out/share/nixery-local/config.toml
  '';

  meta = {
    description = manifest.description;
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = "nixery-local";
    platforms = lib.platforms.linux;
  };
}
