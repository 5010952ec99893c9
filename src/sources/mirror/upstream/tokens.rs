//! The Bearer token flow: asking a challenge's realm for a token (with the
//! registry's credentials, if any) and caching it per (host, scope) until
//! just before it expires.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};

use super::{error_chain, UpstreamError, Upstreams};
use crate::oci::reference::RegistryHost;

/// Token responses are small; anything bigger is refused.
const MAX_TOKEN_RESPONSE: usize = 1 << 20;
/// Tokens without `expires_in` live this long (the spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// A cached Bearer token.
pub(super) struct Token {
    pub(super) value: HeaderValue,
    pub(super) expires: Instant,
}

impl Upstreams {
    pub(super) async fn fetch_token(
        &self,
        host: &RegistryHost,
        trusted: bool,
        params: &HashMap<String, String>,
        scope: &str,
    ) -> Result<(), UpstreamError> {
        let realm = params.get("realm").ok_or_else(|| UpstreamError::Token {
            realm: String::new(),
            message: "Bearer challenge without a realm".into(),
        })?;
        // The serializer is not Send: finish it before any await.
        let query = {
            let mut q = form_urlencoded::Serializer::new(String::new());
            if let Some(service) = params.get("service") {
                q.append_pair("service", service);
            }
            q.append_pair("scope", params.get("scope").map_or(scope, String::as_str));
            q.finish()
        };
        let sep = if realm.contains('?') { '&' } else { '?' };
        let url = format!("{realm}{sep}{query}");
        let token_err = |message: String| UpstreamError::Token {
            realm: realm.clone(),
            message,
        };
        let uri: Uri = url
            .parse()
            .map_err(|_| token_err("invalid realm URL".into()))?;
        let mut req = Request::get(uri.clone());
        if let Some(c) = self.credentials.get(host) {
            req = req.header(header::AUTHORIZATION, c.basic());
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| token_err(e.to_string()))?;
        let client = self.client_for(host, &uri, trusted)?;
        let resp = tokio::time::timeout(self.settings.timeout, client.request(req))
            .await
            .map_err(|_| token_err("timed out".into()))?
            .map_err(|e| token_err(error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(token_err(format!("status {}", resp.status())));
        }
        let body = tokio::time::timeout(
            self.settings.timeout,
            Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE).collect(),
        )
        .await
        .map_err(|_| token_err("timed out".into()))?
        .map_err(|e| token_err(e.to_string()))?
        .to_bytes();
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| token_err(e.to_string()))?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .ok_or_else(|| token_err("no token in the response".into()))?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| token_err("token is not a valid header value".into()))?;
        value.set_sensitive(true);
        let lifetime = parsed
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        // Refresh a little early so a token does not expire mid-request.
        let expires = Instant::now() + lifetime.saturating_sub(Duration::from_secs(5));
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert((host.clone(), scope.to_owned()), Token { value, expires });
        }
        Ok(())
    }
}
