# nixery-local for Nix users, without flakes:
#
#   nix-build nix -A package                # the daemon, with its systemd units
#   imports = [ ./path/to/nixery-local/nix/module.nix ];   # NixOS
#
# `module` is the NixOS module (services.nixery-local); its default package
# is built from this checkout with the system's nixpkgs.
{ pkgs ? import <nixpkgs> { } }:
{
  package = pkgs.callPackage ./package.nix { };
  module = ./module.nix;
}
