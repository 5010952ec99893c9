# A manual check, not part of CI (CI machines have no nixpkgs): evaluates the
# NixOS module and the package against a real nixpkgs (25.05 or later).
#
#   NIX_PATH=nixpkgs=/path/to/nixpkgs nix-instantiate --eval --strict --json nix/tests/eval-nixos.nix
#
# Run it from the repository root. It has not been run yet: see the closing note of issue #5.
let
  nixos = import <nixpkgs/nixos> {
    configuration = {
      imports = [ ../module.nix ];
      boot.isContainer = true;
      system.stateVersion = "25.05";
      services.nixery-local = {
        enable = true;
        settings.tag-ttl = 30;
        containerdMirror.enable = true;
      };
    };
  };
  c = nixos.config;
in {
  drv = (import ../. { }).package.drvPath;
  service = c.systemd.units."nixery-local.service".text;
  socket = c.systemd.units."nixery-local.socket".text;
  etc = builtins.attrNames c.environment.etc;
  users = c.users.users.nixery-local.isSystemUser;
}
