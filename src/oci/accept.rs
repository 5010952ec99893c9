//! Content negotiation: the media types a client said it can read.

/// The media types a client said it can read (its `Accept` header).
#[derive(Clone, Debug, Default)]
pub(crate) struct Accept {
    /// Bare `type/subtype` values, parameters stripped. Empty: anything.
    types: Vec<String>,
}

impl Accept {
    /// Parses the values of every `Accept` header of a request. Values that
    /// are not UTF-8 are ignored: they cannot name a manifest type.
    pub(crate) fn from_header_values<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Accept {
        let mut types = Vec::new();
        for value in values {
            let Ok(value) = std::str::from_utf8(value) else {
                continue;
            };
            for item in value.split(',') {
                let bare = item.split(';').next().unwrap_or("").trim();
                if !bare.is_empty() {
                    types.push(bare.to_ascii_lowercase());
                }
            }
        }
        Accept { types }
    }

    pub(crate) fn accepts(&self, media_type: &str) -> bool {
        if self.types.is_empty() {
            return true;
        }
        let media_type = media_type.to_ascii_lowercase();
        let top = media_type.split('/').next().unwrap_or("");
        self.types.iter().any(|t| {
            t == "*/*"
                || *t == media_type
                || t.strip_suffix("/*").is_some_and(|prefix| prefix == top)
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const OCI: &str = "application/vnd.oci.image.manifest.v1+json";
    pub(crate) const DOCKER: &str = "application/vnd.docker.distribution.manifest.v2+json";

    pub(crate) fn accept(v: &str) -> Accept {
        Accept::from_header_values([v.as_bytes()])
    }

    #[test]
    fn accept_matches_types_wildcards_and_parameters() {
        assert!(Accept::default().accepts(OCI));
        assert!(accept("*/*").accepts(OCI));
        assert!(accept("application/*").accepts(OCI));
        assert!(accept(&format!("{DOCKER}, {OCI};q=0.5")).accepts(OCI));
        assert!(!accept(DOCKER).accepts(OCI));
        assert!(!accept("text/*").accepts(OCI));
    }
}
