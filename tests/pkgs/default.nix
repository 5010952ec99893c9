# A tiny package set for nixery-local's tests and benchmarks.
#
# Called with `{}` (or `{ system = "aarch64-linux"; }`), it yields an attribute
# set of derivations, like nixpkgs. Everything is built with the host's
# busybox-static: no network, no nixpkgs. Packages reference each other by
# store path in their outputs, so Nix sees a real runtime-reference graph.
#
# The host's busybox is copied into the store at evaluation time (a directory
# holding only `busybox`, so argv[0] is "busybox" and it runs as the
# multi-call binary). That keeps builds working with the sandbox on or off.
{ system ? builtins.currentSystem, ... }:

let
  # The first real (non-symlink) directory holding a regular file `busybox`.
  # builtins.path copies a symlinked directory as a symlink (Debian's /bin ->
  # usr/bin), hence the check on the parent's listing.
  isRealDir = d: builtins.pathExists d
    && ((builtins.readDir (dirOf d)).${baseNameOf d} or "") == "directory";
  hasBusybox = d: isRealDir d
    && ((builtins.readDir d).busybox or "") == "regular";
  candidates = builtins.filter hasBusybox [ /usr/bin /bin /usr/sbin /sbin /usr/local/bin ];
  busyboxDir =
    if candidates == [ ] then throw "tests/pkgs: no busybox found (apt-get install busybox-static)"
    else builtins.head candidates;

  bootstrap = builtins.path {
    path = busyboxDir;
    name = "busybox-static";
    filter = p: _type: p == toString busyboxDir + "/busybox";
  };

  # A derivation whose builder is a busybox shell script. `script` runs with
  # `set -e`; bootstrap busybox runs its applets directly (standalone shell).
  mk = name: script: attrs: derivation ({
    inherit name system;
    builder = "${bootstrap}/busybox";
    args = [ "sh" "-e" "-c" script ];
  } // attrs);

  # A script package: $out/bin/<bin> with a busybox shebang.
  mkScript = name: bin: body: mk name ''
    mkdir -p $out/bin
    cat > $out/bin/${bin} <<'NIXERY_EOF'
    #!${busybox}/bin/sh
    ${body}
    NIXERY_EOF
    chmod 0755 $out/bin/${bin}
  '' { };

  applets = [
    "sh" "ash" "echo" "cat" "ls" "env" "head" "tail" "mkdir" "cp" "mv" "rm"
    "ln" "grep" "sed" "awk" "tr" "wc" "sort" "printf" "true" "false" "sleep"
    "id" "uname" "sha256sum" "vi" "test" "["
  ];

  busybox = mk "busybox" ''
    mkdir -p $out/bin
    cp ${bootstrap}/busybox $out/bin/busybox
    chmod 0555 $out/bin/busybox
    for a in ${builtins.concatStringsSep " " (map (a: "'${a}'") applets)}; do
      ln -s busybox "$out/bin/$a"
    done
  '' { };

  hello = mkScript "hello-1.0" "hello" ''echo "Hello from nix"'';

  libfoo = mk "libfoo-0.1" ''
    mkdir -p $out/lib $out/share/foo
    echo "libfoo data" > $out/share/foo/data.txt
    printf '\177ELF-not-really\n' > $out/lib/libfoo.so.1
    ln -s libfoo.so.1 $out/lib/libfoo.so
  '' { };

  greet = mkScript "greet-2.0" "greet" ''
    ${hello}/bin/hello
    ${busybox}/bin/cat ${libfoo}/share/foo/data.txt
  '';

  # `bash` is busybox's ash behind a wrapper (busybox has no `bash` applet).
  bashInteractive = mk "bash-interactive-5.2" ''
    mkdir -p $out/bin
    printf '#!%s\nexec %s "$@"\n' ${busybox}/bin/sh ${busybox}/bin/sh > $out/bin/bash
    chmod 0755 $out/bin/bash
    ln -s bash $out/bin/sh
  '' { };

  # Symlinks straight to the busybox binary: argv[0] picks the applet.
  coreutils = mk "coreutils-9.1" ''
    mkdir -p $out/bin
    for a in env cat ls echo head tail cp mv rm mkdir ln sort wc true false; do
      ln -s ${busybox}/bin/busybox $out/bin/$a
    done
  '' { };

  moreutils = mkScript "moreutils-0.67" "sponge" ''
    t=$(${busybox}/bin/busybox mktemp)
    ${busybox}/bin/cat > "$t"
    ${busybox}/bin/cat "$t" > "''${1:-/dev/stdout}"
    ${busybox}/bin/rm -f "$t"
  '';

  nano = mkScript "nano-7.2" "nano" ''exec ${busybox}/bin/vi "$@"'';

  cacert = mk "nss-cacert-3.92" ''
    mkdir -p $out/etc/ssl/certs
    printf '# nixery-local test bundle: no real certificates\n' > $out/etc/ssl/certs/ca-bundle.crt
  '' { };

  iana-etc = mk "iana-etc-20230316" ''
    mkdir -p $out/etc
    printf 'http\t80/tcp\nhttps\t443/tcp\n' > $out/etc/services
    printf 'ip\t0\tIP\ntcp\t6\tTCP\nudp\t17\tUDP\n' > $out/etc/protocols
  '' { };

  python3 = mkScript "python3-3.11.4" "python3" ''echo "python3 stand-in"'';

  python3Packages = {
    requests = mk "python3.11-requests-2.31.0" ''
      mkdir -p $out/lib/python3.11/site-packages/requests
      echo "# requests stand-in for ${python3}" > $out/lib/python3.11/site-packages/requests/__init__.py
    '' { };
  };

  haskellPackages = {
    foo = mkScript "foo-0.1.0" "foo" ''echo "foo from haskellPackages"'';
  };

  _1password = mkScript "1password-8.10" "1password" ''echo "1password stand-in"'';

  # ---- Benchmark closure -------------------------------------------------
  # bigPart<i>: ~24 MiB of deterministic data, half incompressible bytes and
  # half decimal text (gzip ~2x), so compressors see a realistic mix. A 1 MiB
  # seed from awk's seeded rand() is expanded by byte rotations with tr: every
  # 1 MiB block differs, so no compressor window finds long repeats.
  mkPart = name: seed: blocks: refs: mk name ''
    mkdir -p $out/share/${name}
    d=$out/share/${name}
    awk 'BEGIN { srand(${toString seed}); for (i = 0; i < 1048576; i++) printf "%c", int(rand() * 256) }' > s0
    awk 'BEGIN { srand(${toString (seed + 1000)}); for (i = 0; i < 95325; i++) printf "%d\n", int(rand() * 2147483647) }' > t0
    i=0
    while [ $i -lt ${toString blocks} ]; do
      cat s0 >> $d/blob.bin
      tr '\000-\377' '\001-\377\000' < s0 > s1; mv s1 s0
      cat t0 >> $d/table.txt
      tr '0-9' '1-90' < t0 > t1; mv t1 t0
      i=$((i + 1))
    done
    printf '%s\n' ${builtins.concatStringsSep " " (map toString refs)} > $d/deps
  '' { };

  # 20 parts of 12 blocks (1 MiB of bytes + ~1 MiB of text each), ~24 MiB
  # per part. Parts come in chains of four (1<-2<-3<-4, 5<-6<-7<-8, ...:
  # each references its predecessor through the `deps` file), so the graph
  # has depth for the dominator grouping.
  #   big:    20 parts + busybox, ~493 MB in 22 store paths
  #   medium: parts 1-16 + its own ~24 MiB part, ~420 MB, 17 paths shared
  #   small:  parts 1-2
  partNames = builtins.genList (i: i + 1) 20;
  parts = builtins.listToAttrs (map (i: {
    name = "part${toString i}";
    value = mkPart "big-part-${toString i}" i 12
      (if builtins.elem (i - (i / 4) * 4) [ 2 3 0 ] && i > 1 then [ parts."part${toString (i - 1)}" ] else [ ]);
  }) partNames);
  partList = from: to: map (i: parts."part${toString i}") (builtins.genList (i: i + from) (to - from + 1));

  mkBundle = name: ps: mkScript name name ''
    echo "${name}: ${toString (builtins.length ps)} parts"
    ${builtins.concatStringsSep "\n" (map (p: "# ${p}") ps)}
  '';

  big = mkBundle "big" (partList 1 20);
  medium = mkBundle "medium" (partList 1 16 ++ [ (mkPart "medium-extra" 101 12 [ ]) ]);
  small = mkBundle "small" (partList 1 2);

in {
  inherit busybox hello libfoo greet bashInteractive coreutils moreutils nano
    cacert iana-etc python3 python3Packages haskellPackages _1password
    big medium small;
  bigParts = parts;
  # A package whose build never finishes in time, for timeout tests. The
  # `nonce` argument makes a fresh derivation per test run.
  slow = { nonce ? "0" }: mk "slow-${nonce}" "sleep 600" { };
  # A package whose build takes 8 s, for restarting the service during a
  # build (tests/service_booted.rs). The marker names its builder process.
  sleepy = mk "sleepy-1.0" ''
    : nixery-local-sleepy-builder
    sleep 8
    mkdir -p $out/bin
    printf '#!%s\necho "sleepy woke up"\n' ${busybox}/bin/sh > $out/bin/sleepy
    chmod 0755 $out/bin/sleepy
  '' { };
  # A build of about 12 s (longer than the daemon's 10 s drain) that is new to the store in every test run (the
  # daemon's NIXERY_TEST_NONCE is in its name), for stopping the daemon
  # during a build.
  napping = mk "napping-${builtins.getEnv "NIXERY_TEST_NONCE"}" ''
    sleep 12
    mkdir -p $out/bin
    printf '#!%s\necho "napped"\n' ${busybox}/bin/sh > $out/bin/napping
    chmod 0755 $out/bin/napping
  '' { };
  # A package whose build fails, for error-path tests.
  broken = mk "broken-1" ''
    echo "about to fail: this is the useful tail" >&2
    exit 3
  '' { };
}
