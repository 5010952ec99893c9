# nixery-local's config file from an attribute set, with builtins only (no
# nixpkgs lib), so CI can evaluate it and feed the result to the daemon.
#
# The file is flat: each key is a flag of `nixery-local serve --help` without
# the dashes; values are strings, integers, booleans, paths or lists of
# strings. Keys whose value is null are left out (the daemon's default
# applies). Keys come out sorted.
settings:
let
  inherit (builtins) attrNames concatStringsSep filter isBool isInt isList isPath isString map match toJSON typeOf;

  # A TOML basic string: JSON's escapes (\" \\ \n \t \uXXXX) are TOML's.
  string = s: toJSON s;

  key = k: if match "[A-Za-z0-9_-]+" k != null then k else string k;

  value = k: v:
    if isBool v then (if v then "true" else "false")
    else if isInt v then toString v
    else if isString v then string v
    # toString keeps the path as written, without copying it to the store.
    else if isPath v then string (toString v)
    else if isList v then "[" + concatStringsSep ", " (map (value k) v) + "]"
    else throw "nixery-local settings: ${k} is a ${typeOf v}; use a string, integer, boolean, path or list";

  keys = filter (k: settings.${k} != null) (attrNames settings);
in
concatStringsSep "" (map (k: "${key k} = ${value k settings.${k}}\n") keys)
