# NixOS module for nixery-local: the daemon as a socket-activated system
# service, its config file from `services.nixery-local.settings`, its system
# user, and (optionally) containerd's mirror configuration for this host.
#
#   imports = [ /path/to/nixery-local/nix/module.nix ];
#   services.nixery-local = {
#     enable = true;
#     settings.pkgs-channel = "nixos-25.05";
#     containerdMirror.enable = true;
#   };
#
# The units are the repository's own (systemd/, installed by package.nix);
# this module only adds a drop-in: ExecStart with the generated config, PATH
# with Nix and git, the Nix daemon dependency, and the socket's address.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkEnableOption mkIf mkMerge mkOption types;

  cfg = config.services.nixery-local;

  toTOML = import ./toml.nix;
  hostsToml = import ./hosts-toml.nix;

  configFile = pkgs.writeText "nixery-local.toml" (toTOML cfg.settings);

  nixRegistries =
    if cfg.settings.nix-registry == null then [ "nix.local" ] else cfg.settings.nix-registry;
  mirrored = nixRegistries ++ (if cfg.containerdMirror.all then [ "_default" ] else cfg.containerdMirror.registries);
in
{
  options.services.nixery-local = {
    enable = mkEnableOption "nixery-local, a local registry mirror that builds Nix images on pull";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The nixery-local package (its units in lib/systemd are used).";
    };

    settings = mkOption {
      description = ''
        nixery-local's config file (`serve --config`). Keys are the flags of
        `nixery-local serve --help` without the dashes, for example
        `state-dir`, `default-registry`, `pkgs-path`, `pkgs-channel`,
        `nix-registry` (a list), `layer-compression`, `upstream` (a list of
        `HOST=URL`), `offline`, `tag-ttl`. Null values are left out.
        Credentials (`credential`) end up in the world-readable Nix store:
        prefer Docker's config.json in the service's home.
      '';
      default = { };
      example = lib.literalExpression ''
        {
          pkgs-channel = "nixos-25.05";
          layer-compression = "zstd";
          upstream = [ "registry.internal:5000=http://10.0.0.5:5000" ];
          tag-ttl = 300;
        }
      '';
      type = types.submodule {
        freeformType = with types; attrsOf (nullOr (oneOf [ bool int str path (listOf str) ]));
        options = {
          listen = mkOption {
            type = types.str;
            default = "127.0.0.1:7733";
            description = ''
              Where the daemon listens: the socket unit's ListenStream=, and
              the address containerd's mirror entries point at. Loopback
              unless you mean to serve the cache to other machines.
            '';
          };
          state-dir = mkOption {
            type = types.str;
            default = "/var/lib/nixery-local";
            description = ''
              The cache: the service's StateDirectory=. It is named in
              /etc/nixery-local/config.toml so that every nixery-local command
              (import, ls, gc, build, prefetch, doctor) uses the same cache.
            '';
          };
          nix-registry = mkOption {
            type = with types; nullOr (listOf str);
            default = null;
            example = [ "nix.local" ];
            description = "Registry hosts whose every repository is a Nix image (the daemon's default: nix.local).";
          };
        };
      };
    };

    containerdMirror = {
      enable = mkEnableOption ''
        containerd's mirror configuration for this host: a
        /etc/containerd/certs.d/<host>/hosts.toml for each Nix registry and
        each of `registries` (what `nixery-local setup containerd` writes), and
        the CRI plugin's `registry.config_path` pointing there. Other registries'
        images keep their upstream as containerd's fallback
      '';

      registries = mkOption {
        type = with types; listOf str;
        default = [ "docker.io" "ghcr.io" "quay.io" "registry.k8s.io" ];
        description = "Registries to pull through the daemon.";
      };

      all = mkOption {
        type = types.bool;
        default = false;
        description = "Mirror every registry: one `_default` entry instead of `registries`.";
      };
    };
  };

  config = mkMerge [
    (mkIf cfg.enable {
      environment.systemPackages = [ cfg.package ];
      # For `nixery-local setup … --config /etc/nixery-local/config.toml`, as
      # on Debian; the service reads the store path itself.
      environment.etc."nixery-local/config.toml".source = configFile;

      systemd.packages = [ cfg.package ];

      systemd.services.nixery-local = {
        overrideStrategy = "asDropin";
        wantedBy = [ "multi-user.target" ];
        wants = [ "nix-daemon.socket" ];
        after = [ "nix-daemon.socket" ];
        # Evaluations and builds run nix-instantiate and nix-store; git
        # fetches pkgs-repo.
        path = [ config.nix.package pkgs.git ];
        # Without a pkgs-* setting the daemon builds from <nixpkgs>, which a
        # service finds only through NIX_PATH.
        environment = lib.optionalAttrs (config.nix.nixPath != [ ]) {
          NIX_PATH = lib.concatStringsSep ":" config.nix.nixPath;
        };
        restartTriggers = [ configFile ];
        serviceConfig.ExecStart = [
          ""
          "${cfg.package}/bin/nixery-local serve --config ${configFile}"
        ];
      };

      systemd.sockets.nixery-local = {
        overrideStrategy = "asDropin";
        wantedBy = [ "sockets.target" ];
        socketConfig.ListenStream = [ "" cfg.settings.listen ];
      };

      # Static, not DynamicUser=: it owns the cache and the GC-root links in
      # it across restarts (see the unit's comments).
      users.users.nixery-local = {
        isSystemUser = true;
        group = "nixery-local";
        home = "/var/lib/nixery-local";
        description = "nixery-local registry mirror";
      };
      users.groups.nixery-local = { };
    })

    (mkIf (cfg.enable && cfg.containerdMirror.enable) {
      virtualisation.containerd.settings.plugins."io.containerd.grpc.v1.cri".registry.config_path =
        "/etc/containerd/certs.d";

      environment.etc = lib.listToAttrs (map
        (host: lib.nameValuePair "containerd/certs.d/${host}/hosts.toml" {
          text = hostsToml { inherit host nixRegistries; inherit (cfg.settings) listen; };
        })
        (lib.unique mirrored));
    })
  ];
}
