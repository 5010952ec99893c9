# containerd's certs.d/<host>/hosts.toml pointing `host` at the daemon, with
# builtins only (no nixpkgs lib). The same file `nixery-local setup containerd
# --listen LISTEN` writes (src/ops/setup/containerd.rs), but for its header comment; CI
# compares the two.
#
#   import ./hosts-toml.nix { host = "docker.io"; listen = "127.0.0.1:7733"; }
{
  # A registry host ("docker.io", "ghcr.io", "localhost:5000"), a Nix
  # registry ("nix.local"), or "_default" for every registry without a
  # directory of its own.
  host,
  # The daemon's `listen` address; an unspecified one (0.0.0.0, [::]) is
  # reached on loopback.
  listen ? "127.0.0.1:7733",
  # Registries that exist only in the daemon: no upstream to fall back to.
  nixRegistries ? [ "nix.local" ],
  header ? "# Managed by NixOS (services.nixery-local.containerdMirror); edit the NixOS configuration instead.\n",
}:
let
  inherit (builtins) elem head match;

  v4Any = match "0\\.0\\.0\\.0:([0-9]+)" listen;
  v6Any = match "\\[::]:([0-9]+)" listen;
  address =
    if v4Any != null then "127.0.0.1:${head v4Any}"
    else if v6Any != null then "[::1]:${head v6Any}"
    else listen;
  mirrorUrl = "http://${address}";

  # Where a registry really is: Docker Hub's API is not at docker.io.
  upstream = if host == "docker.io" then "https://registry-1.docker.io" else "https://${host}";

  server =
    # containerd's default server for `_default` is each image's own registry.
    if host == "_default" then ""
    # Without a server containerd would fall back to https://nix.local (a DNS
    # lookup whose error hides the daemon's answer): the daemon is both.
    else if elem host nixRegistries then
      "# ${host} exists only in nixery-local: the daemon is also the server, so\n"
      + "# containerd never looks the name up.\nserver = \"${mirrorUrl}\"\n"
    else "server = \"${upstream}\"\n";
in
header
+ server
+ "\n[host.\"${mirrorUrl}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
