# Evaluates module.nix without nixpkgs, for CI (tests/packaging.rs): a stub
# of the few `lib` functions the module uses, the option defaults read back
# from the module's own declarations, and a summary of the resulting NixOS
# config as JSON. It checks the module's wiring (names, ExecStart, the
# generated config file and hosts.toml files), not the NixOS type checks:
# with nixpkgs at hand, evaluate a real system instead (see README).
#
#   nix-instantiate --eval --strict --json nix/tests/eval-module.nix \
#     --arg settings '{ offline = true; }' --arg containerdMirror '{ enable = true; }'
{ settings ? { }, containerdMirror ? { }, enable ? true }:
let
  inherit (builtins) attrNames foldl' isAttrs isList listToAttrs mapAttrs removeAttrs;

  # Deep merge, as the module system merges definitions: attribute sets
  # recursively, lists concatenated, anything else must not collide.
  merge = a: b: a // mapAttrs
    (n: v:
      if !(a ? ${n}) then v
      else if isAttrs v && isAttrs a.${n} then merge a.${n} v
      else if isList v && isList a.${n} then a.${n} ++ v
      else throw "eval-module: ${n} is defined twice")
    b;

  lib = {
    mkOption = o: o;
    mkEnableOption = name: { default = false; description = "Whether to enable ${name}."; };
    mkIf = cond: content: if cond then content else { };
    mkMerge = foldl' merge { };
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    nameValuePair = name: value: { inherit name value; };
    inherit listToAttrs;
    inherit (builtins) concatStringsSep;
    optionalAttrs = cond: attrs: if cond then attrs else { };
    unique = foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ];
    types = {
      submodule = m: { submoduleOptions = m.options; };
      bool = "bool"; int = "int"; str = "str"; path = "path"; package = "package";
      attrsOf = t: { attrsOf = t; };
      listOf = t: { listOf = t; };
      nullOr = t: { nullOr = t; };
      oneOf = ts: { oneOf = ts; };
    };
  };

  pkgs = {
    # A store-path-like string that keeps its text (nothing is written).
    writeText = name: text: {
      inherit name text;
      __toString = self: "/nix/store/00000000000000000000000000000000-${self.name}";
    };
    git = "/nix/store/00000000000000000000000000000000-git-stub";
    callPackage = _: _: throw "eval-module: the package is not built here";
  };

  package = "/nix/store/00000000000000000000000000000000-nixery-local-stub";

  module = import ../module.nix;
  declared = (module { inherit lib pkgs config; }).options.services.nixery-local;
  defaults = opts: mapAttrs (_: o: o.default) opts;

  config = {
    services.nixery-local = {
      inherit enable package;
      settings = defaults declared.settings.type.submoduleOptions // settings;
      containerdMirror = defaults declared.containerdMirror // containerdMirror;
    };
    nix.package = "/nix/store/00000000000000000000000000000000-nix-stub";
    nix.nixPath = [ "nixpkgs=/nix/var/nix/profiles/per-user/root/channels/nixos" "/etc/nix/path" ];
  };

  result = (module { inherit lib pkgs config; }).config;
  service = result.systemd.services.nixery-local;
  socket = result.systemd.sockets.nixery-local;
  etc = result.environment.etc or { };
in
if !enable then { config = result; } else {
  inherit (service) wantedBy wants after overrideStrategy environment;
  execStart = service.serviceConfig.ExecStart;
  path = service.path;
  listenStream = socket.socketConfig.ListenStream;
  socketWantedBy = socket.wantedBy;
  systemdPackages = result.systemd.packages;
  user = result.users.users.nixery-local;
  groups = attrNames result.users.groups;
  configText = etc."nixery-local/config.toml".source.text;
  hostsFiles = mapAttrs (_: f: f.text) (removeAttrs etc [ "nixery-local/config.toml" ]);
  containerdConfigPath =
    result.virtualisation.containerd.settings.plugins."io.containerd.grpc.v1.cri".registry.config_path or null;
}
