//! Platforms: which of an index's manifests this machine runs. The one
//! place that maps Rust's architecture names to OCI's and chooses from an
//! index, for prefetch, blobserve and anything else that must pick.

use crate::oci::manifest::Descriptor;

/// The OCI name of this machine's architecture.
pub(crate) fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        other => other,
    }
}

/// The entries of an index that are for this machine (linux, its
/// architecture), in index order; all of them when none says its platform.
pub(crate) fn for_this_host(manifests: &[Descriptor]) -> Vec<&Descriptor> {
    let arch = host_architecture();
    let ours: Vec<&Descriptor> = manifests
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .collect();
    if ours.is_empty() && manifests.iter().all(|d| d.platform.is_none()) {
        manifests.iter().collect()
    } else {
        ours
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::manifest::{children, Children, OCI_INDEX};

    fn index(entries: &[(&str, Option<&str>)]) -> Vec<Descriptor> {
        let list: Vec<String> = entries
            .iter()
            .map(|(hex, arch)| {
                let platform = arch
                    .map(|a| format!(r#","platform":{{"os":"linux","architecture":"{a}"}}"#))
                    .unwrap_or_default();
                format!(
                    r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:{}"{platform}}}"#,
                    hex.repeat(64)
                )
            })
            .collect();
        let body = format!(r#"{{"schemaVersion":2,"manifests":[{}]}}"#, list.join(","));
        match children(OCI_INDEX, body.as_bytes()) {
            Ok(Children::Manifests(m)) => m,
            other => panic!("not an index: {other:?}"),
        }
    }

    #[test]
    fn picks_the_host_platform_from_an_index() {
        let list = index(&[("a", Some("amd64")), ("b", Some("arm64"))]);
        let picked = for_this_host(&list);
        assert_eq!(picked.len(), 1);
        let expected = if host_architecture() == "amd64" {
            "a"
        } else {
            "b"
        };
        assert_eq!(picked[0].digest.hex(), expected.repeat(64));
    }

    #[test]
    fn without_platforms_every_entry_is_ours() {
        assert_eq!(for_this_host(&index(&[("a", None), ("b", None)])).len(), 2);
        assert!(for_this_host(&index(&[("a", Some("s390")), ("b", None)])).is_empty());
    }
}
