//! A wake or sleep recipe that calls a URL (SPEC §12): [`UrlRecipe`]. vLLM's
//! `POST /wake_up` and `POST /sleep`, Ollama's `POST /api/generate` with `keep_alive`,
//! a webhook that powers a box on.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Url};
use serde_json::Value;
use virtual_llm_core::{Error, Recipe};

use crate::upstream::why_not;

/// How long a call may take, unless [`UrlRecipe::with_timeout`] says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A recipe that sends one HTTP request: 2xx is success, anything else fails with
/// `HTTP <status>`, and no answer fails saying why in general words (`connection
/// refused`, `timed out`). Neither a failure nor [`Debug`](fmt::Debug) names the URL's
/// path or query, nor any header value: they may carry a token. Redirects are not
/// followed.
///
/// # Example
///
/// vLLM's sleep mode (a server started with `--enable-sleep-mode`):
///
/// ```
/// # fn run() -> Result<(), virtual_llm_core::Error> {
/// use std::sync::Arc;
/// use virtual_llm_core::Recipe;
/// use virtual_llm_openai::UrlRecipe;
///
/// let wake: Arc<dyn Recipe> = Arc::new(UrlRecipe::new("POST", "http://127.0.0.1:8000/wake_up")?);
/// let sleep: Arc<dyn Recipe> = Arc::new(
///     UrlRecipe::new("POST", "http://127.0.0.1:8000/sleep?level=1")?
///         .with_header("Authorization", "Bearer local-key")?,
/// );
/// # Ok(()) }
/// # run().unwrap();
/// ```
#[derive(Clone)]
pub struct UrlRecipe {
    method: Method,
    url: Url,
    /// `host:port`, for logs and `Debug`.
    host: String,
    /// Every value marked sensitive.
    headers: HeaderMap,
    body: Option<Bytes>,
    /// The body is JSON: sent with `content-type: application/json` unless the headers
    /// name another.
    json: bool,
    timeout: Duration,
    client: reqwest::Client,
}

impl fmt::Debug for UrlRecipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UrlRecipe")
            .field("method", &self.method)
            .field("host", &self.host)
            .field("headers", &self.headers.len())
            .field("body", &self.body.as_ref().map(Bytes::len))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl UrlRecipe {
    /// Sends `method` (`POST`, `GET`… any case) to `url`, with no header, no body and
    /// a 30 s timeout.
    ///
    /// Fails with [`Error::InvalidRequest`] for a method that is not one, or a URL that
    /// is not `http` or `https`.
    pub fn new(method: &str, url: &str) -> Result<Self, Error> {
        let method = Method::from_bytes(method.trim().to_ascii_uppercase().as_bytes())
            .map_err(|_| Error::invalid(format!("{method:?} is not an HTTP method")))?;
        let url = Url::parse(url.trim())
            .map_err(|e| Error::invalid(format!("invalid recipe url: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::invalid("a recipe url must be http or https"));
        }
        let host = match (url.host_str(), url.port_or_known_default()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => return Err(Error::invalid("a recipe url must name a host")),
        };
        Ok(UrlRecipe {
            method,
            url,
            host,
            headers: HeaderMap::new(),
            body: None,
            json: false,
            timeout: DEFAULT_TIMEOUT,
            client: build_client(DEFAULT_TIMEOUT)?,
        })
    }

    /// Sends the header `name: value` too (its value never shows in logs).
    ///
    /// Fails with [`Error::InvalidRequest`] when either cannot be a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Result<Self, Error> {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Error::invalid(format!("{name:?} is not a header name")))?;
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| Error::invalid(format!("the value of header {name} is not valid")))?;
        value.set_sensitive(true);
        self.headers.append(header, value);
        Ok(self)
    }

    /// Sends `body`: a JSON string as its text, as it is; anything else as JSON (with
    /// `content-type: application/json` unless a header sets one).
    #[must_use]
    pub fn with_body(mut self, body: Value) -> Self {
        match body {
            Value::String(text) => {
                self.body = Some(Bytes::from(text));
                self.json = false;
            }
            other => {
                self.body = Some(Bytes::from(other.to_string()));
                self.json = true;
            }
        }
        self
    }

    /// Gives up after `timeout` instead of 30 s.
    ///
    /// Fails with [`Error::InvalidRequest`] when the HTTP client cannot be built.
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self, Error> {
        self.client = build_client(timeout)?;
        self.timeout = timeout;
        Ok(self)
    }
}

#[async_trait]
impl Recipe for UrlRecipe {
    async fn run(&self) -> Result<(), String> {
        tracing::debug!(method = %self.method, host = %self.host, "calling a recipe url");
        let mut request = self
            .client
            .request(self.method.clone(), self.url.clone())
            .headers(self.headers.clone());
        if let Some(body) = &self.body {
            if self.json && !self.headers.contains_key(CONTENT_TYPE) {
                request = request.header(CONTENT_TYPE, "application/json");
            }
            request = request.body(body.clone());
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => {
                let status = response.status();
                tracing::debug!(host = %self.host, %status, "the recipe url refused");
                Err(match status.canonical_reason() {
                    Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
                    None => format!("HTTP {}", status.as_u16()),
                })
            }
            Err(e) => {
                tracing::warn!(host = %self.host, error = why_not(&e), "the recipe url did not answer");
                Err(format!("the recipe url did not answer: {}", why_not(&e)))
            }
        }
    }
}

fn build_client(timeout: Duration) -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("virtual-llm/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::invalid(format!("cannot build the recipe's http client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_urls_and_headers_are_checked_and_secrets_never_shown() {
        assert!(UrlRecipe::new("post", "http://127.0.0.1:8000/wake_up").is_ok());
        for (method, url) in [
            ("PO ST", "http://h/x"),
            ("POST", "ftp://h/x"),
            ("POST", "not a url"),
        ] {
            assert_eq!(
                UrlRecipe::new(method, url).unwrap_err().status(),
                400,
                "{method} {url}"
            );
        }
        let recipe = UrlRecipe::new("POST", "http://h:8000/sleep?token=sk-in-url").unwrap();
        assert!(recipe.clone().with_header("bad name", "x").is_err());
        assert!(recipe.clone().with_header("x-key", "bad\nvalue").is_err());
        let recipe = recipe
            .with_header("authorization", "Bearer sk-secret")
            .unwrap();
        let shown = format!("{recipe:?}");
        assert!(
            !shown.contains("sk-secret") && !shown.contains("sk-in-url"),
            "{shown}"
        );
        assert!(shown.contains("h:8000"), "{shown}");
    }
}
