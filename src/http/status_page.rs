//! The status page at `/`: what is cached, recent pulls and builds with
//! their durations and errors, and the client setup to copy. This module
//! owns the page's HTML; the events come from [`crate::telemetry::events`], the data
//! about the cache comes from [`crate::store::gc::images`] through the registry.

use std::fmt::Write as _;

use crate::ops::setup::hosts_toml;
use crate::store::gc::{CachedImage, ImageId};
use crate::telemetry::activity::ACTIVITIES;
use crate::telemetry::events::EVENTS;
use crate::util::time::now_secs;
use crate::util::units::{human_age, human_bytes};

/// Text for HTML content and attribute values.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn ago(now: u64, then: u64) -> String {
    format!("{} ago", human_age(now.saturating_sub(then)))
}

/// The page. `addr` is what clients should use to reach the daemon.
pub(crate) fn render(
    addr: &str,
    images: &[CachedImage],
    name: &dyn Fn(&ImageId) -> String,
    cache_bytes: u64,
    limit: Option<u64>,
) -> String {
    let now = now_secs();
    let running = ACTIVITIES.snapshot();
    // The page follows what happens: often while work runs, calmly otherwise.
    let refresh = if running.is_empty() { 10 } else { 2 };
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nixery-local</title>
<meta http-equiv="refresh" content="{refresh}">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 72rem; }}
h1 {{ margin-bottom: 0; }} .sub {{ color: #666; margin-top: .2rem; }}
table {{ border-collapse: collapse; width: 100%; margin-bottom: 1.5rem; }}
th, td {{ text-align: left; padding: .3rem .6rem; border-bottom: 1px solid #ddd; font-size: .9rem; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
code, pre {{ background: #f4f4f4; padding: .1rem .3rem; border-radius: 3px; }}
pre {{ padding: .8rem; overflow-x: auto; }}
.err {{ color: #b00020; }} .ok {{ color: #0a7d28; }}
</style></head><body>
<h1>nixery-local</h1>
<p class="sub">Registry mirror at <code>http://{addr}</code>: {count} cached {noun}, {size}{limit}. <a href="/metrics">metrics</a></p>
"#,
        addr = escape(addr),
        count = images.len(),
        noun = if images.len() == 1 { "image" } else { "images" },
        size = human_bytes(cache_bytes),
        limit = limit.map_or(String::new(), |l| format!(" of {} allowed", human_bytes(l))),
    );

    h.push_str("<h2>In progress</h2>\n");
    if running.is_empty() {
        h.push_str("<p>Nothing is building or downloading.</p>\n");
    } else {
        h.push_str("<table id=\"running\"><tr><th>what</th><th>image</th><th>for</th><th>stage</th></tr>\n");
        for a in &running {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td><code>{}</code></td><td class=\"num\">{}</td><td>{}</td></tr>",
                a.kind,
                escape(&a.name),
                human_age(a.elapsed.as_secs()),
                escape(&a.stage),
            );
        }
        h.push_str("</table>\n");
    }

    h.push_str("<h2>Recent pulls and builds</h2>\n");
    let events = EVENTS.snapshot();
    if events.is_empty() {
        h.push_str("<p>None since the daemon started.</p>\n");
    } else {
        h.push_str("<table id=\"events\"><tr><th>when</th><th>what</th><th>image</th><th>took</th><th>outcome</th></tr>\n");
        for e in &events {
            let outcome = match &e.error {
                None => "<span class=\"ok\">ok</span>".to_owned(),
                Some(m) => format!("<span class=\"err\">{}</span>", escape(m)),
            };
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td class=\"num\">{} ms</td><td>{outcome}</td></tr>",
                ago(now, e.at),
                e.kind,
                escape(&e.name),
                e.duration.as_millis()
            );
        }
        h.push_str("</table>\n");
    }

    h.push_str("<h2>Cached images</h2>\n");
    if images.is_empty() {
        h.push_str("<p>The cache is empty.</p>\n");
    } else {
        h.push_str("<table id=\"images\"><tr><th>image</th><th>digest</th><th>size</th><th>last used</th></tr>\n");
        for img in images.iter().rev() {
            let digest = img
                .manifests
                .first()
                .map(|m| m.digest.to_string())
                .unwrap_or_default();
            let _ = writeln!(
                h,
                "<tr><td><code>{}</code></td><td><code title=\"{d}\">{short}</code></td><td class=\"num\">{}</td><td>{}</td></tr>",
                escape(&name(&img.id)),
                human_bytes(img.size),
                ago(now, img.last_used),
                d = escape(&digest),
                short = escape(digest.get(..19).unwrap_or(&digest)),
            );
        }
        h.push_str("</table>\n");
    }

    let _ = write!(
        h,
        r#"<h2>Client setup</h2>
<p>containerd: <code>sudo nixery-local setup containerd</code> writes this for <code>nix.local</code>, Docker Hub and other registries:</p>
<pre># /etc/containerd/certs.d/docker.io/hosts.toml
{hosts_toml}</pre>
<p>Then <code>ctr images pull --hosts-dir /etc/containerd/certs.d nix.local/hello:latest</code>.
Docker: <code>docker pull {addr}/nix/hello</code>, or <code>sudo nixery-local setup docker</code> for a Docker Hub mirror.
Podman: <code>sudo nixery-local setup podman</code>.</p>
</body></html>
"#,
        addr = escape(addr),
        hosts_toml = escape(&hosts_toml("docker.io", &format!("http://{addr}"))),
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_page_escapes_what_it_shows() {
        EVENTS.record(
            "pull",
            "docker.io/<script>:1".into(),
            Duration::from_millis(12),
            Some("upstream said <b>no</b>".into()),
        );
        let page = render(
            "127.0.0.1:7733",
            &[],
            &|id| id.to_string(),
            1234,
            Some(1_000_000),
        );
        assert!(page.contains("docker.io/&lt;script&gt;:1"));
        assert!(page.contains("upstream said &lt;b&gt;no&lt;/b&gt;"));
        assert!(!page.contains("<script>"));
        assert!(page.contains("1.2 kB of 1.0 MB allowed"));
        assert!(page.contains("[host.&quot;http://127.0.0.1:7733&quot;]"));
    }
}
