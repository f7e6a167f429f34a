//! The guard of the no-token mode: without tokens every caller is an admin, so the
//! gateway must only hear programs of the machine it runs on, not web pages that a
//! browser on that machine happens to show.
//!
//! A browser is a client on loopback too. Three things let a page act as the local
//! user, and [`local_only`] refuses each of them before any route runs:
//!
//! - **A foreign `Host`** (DNS rebinding: a page's own host name resolved to
//!   `127.0.0.1`): only `localhost`, `*.localhost`, `127.0.0.0/8` and `[::1]` are
//!   answered (403 `not_local`). A request without `Host` (HTTP/1.0) is a program's.
//! - **A foreign `Origin`**: a page's request (the publisher WebSocket included, which
//!   CORS does not cover) carries its origin; only the gateway's own origin, and the
//!   origins the operator allowed for CORS, are answered (403 `not_local`). Programs
//!   send no `Origin`.
//! - **A body a page may send without a CORS preflight**: `text/plain`, a form, or no
//!   content type at all. A `POST` must say it is JSON (`application/json`,
//!   `application/*+json`, or `application/x-ndjson` for a publisher's results), else
//!   415 `unsupported_media_type`.
//!
//! With tokens a page cannot act as anyone (it does not hold a token), and none of this
//! applies: a gateway that serves other hosts configures tokens.

use http::Method;
use virtual_llm_core::Error;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::host::Authority;
use warp::reply::Response;

use crate::error::error_response;

/// `routes`, answering only requests that come from a program on this machine or a
/// page of the gateway's own origin (or of one of `allowed_origins`, as given to
/// [`with_cors`](crate::with_cors)). For a gateway without tokens, listening on
/// loopback.
///
/// ```
/// # async fn run(gateway: virtual_llm_core::Gateway) {
/// let routes = virtual_llm_http::routes(gateway, []);
/// let routes = virtual_llm_http::local_only(routes, &[]);
/// # let _ = routes;
/// # }
/// ```
pub fn local_only(
    routes: BoxedFilter<(Response,)>,
    allowed_origins: &[String],
) -> BoxedFilter<(Response,)> {
    let allowed: Vec<String> = allowed_origins
        .iter()
        .map(|o| o.to_ascii_lowercase())
        .collect();
    let allow_any = allowed.iter().any(|o| o == "*");
    let refusal = warp::method()
        .and(warp::host::optional())
        .and(warp::header::optional::<String>("origin"))
        .and(warp::header::optional::<String>("content-type"))
        .and_then(
            move |method: Method,
                  host: Option<Authority>,
                  origin: Option<String>,
                  content_type: Option<String>| {
                let refused = check(
                    &method,
                    host.as_ref(),
                    origin.as_deref(),
                    content_type.as_deref(),
                    |o| allow_any || allowed.iter().any(|a| a.eq_ignore_ascii_case(o)),
                );
                async move {
                    match refused {
                        Some(error) => Ok(error_response(&error)),
                        None => Err(warp::reject()),
                    }
                }
            },
        );
    refusal.or(routes).unify().boxed()
}

/// Why a request is refused, if it is.
fn check(
    method: &Method,
    host: Option<&Authority>,
    origin: Option<&str>,
    content_type: Option<&str>,
    allowed: impl Fn(&str) -> bool,
) -> Option<Error> {
    if let Some(host) = host
        && !is_loopback(host.host())
    {
        return Some(Error::NotLocal {
            reason: "the Host header names another machine",
        });
    }
    if let Some(origin) = origin
        && !allowed(origin)
        && !same_origin(origin, host)
    {
        return Some(Error::NotLocal {
            reason: "the request comes from a web page of another origin",
        });
    }
    if method == Method::POST && !is_json(content_type) {
        return Some(Error::UnsupportedMediaType {
            content_type: virtual_llm_core::error::bounded(content_type.unwrap_or(""), 64),
        });
    }
    None
}

/// `localhost`, a name under `.localhost` (browsers resolve those to loopback
/// themselves), or a loopback address.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    if host.eq_ignore_ascii_case("localhost")
        || host
            .rsplit_once('.')
            .is_some_and(|(_, tld)| tld.eq_ignore_ascii_case("localhost"))
    {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Whether `origin` (`scheme://host[:port]`) is the gateway's own: the host and port
/// the request was sent to. The scheme is not compared: the gateway serves one.
fn same_origin(origin: &str, host: Option<&Authority>) -> bool {
    let Some(host) = host else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return false,
    };
    let Ok(authority) = authority.parse::<Authority>() else {
        return false;
    };
    authority.host().eq_ignore_ascii_case(host.host())
        && authority.port_u16().unwrap_or(default_port) == host.port_u16().unwrap_or(default_port)
}

/// JSON, or NDJSON: what a browser cannot send without a CORS preflight.
fn is_json(content_type: Option<&str>) -> bool {
    let Some(content_type) = content_type else {
        return false;
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence == "application/x-ndjson"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Authority {
        s.parse().unwrap()
    }

    fn refused(
        method: Method,
        h: Option<&str>,
        origin: Option<&str>,
        ct: Option<&str>,
    ) -> Option<u16> {
        let h = h.map(host);
        check(&method, h.as_ref(), origin, ct, |o| {
            o == "https://chat.example.com"
        })
        .map(|e| e.status())
    }

    #[test]
    fn only_loopback_hosts_are_answered() {
        for ok in [
            "127.0.0.1:8080",
            "127.1.2.3",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost:3000",
            "[::1]:8080",
        ] {
            assert_eq!(refused(Method::GET, Some(ok), None, None), None, "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1",
            "[::2]",
            "0.0.0.0:8080",
        ] {
            assert_eq!(
                refused(Method::GET, Some(bad), None, None),
                Some(403),
                "{bad}"
            );
        }
        assert_eq!(
            refused(Method::GET, None, None, None),
            None,
            "no Host: a program"
        );
    }

    #[test]
    fn only_the_own_and_allowed_origins_are_answered() {
        let h = Some("127.0.0.1:8080");
        for ok in [
            "http://127.0.0.1:8080",
            "https://chat.example.com",
            "HTTP://127.0.0.1:8080",
        ] {
            assert_eq!(refused(Method::GET, h, Some(ok), None), None, "{ok}");
        }
        for bad in [
            "http://evil.example",
            "http://127.0.0.1:8081",
            "http://localhost:8080",
            "null",
            "http://127.0.0.1:8080/path",
        ] {
            assert_eq!(refused(Method::GET, h, Some(bad), None), Some(403), "{bad}");
        }
        assert_eq!(
            refused(
                Method::GET,
                Some("127.0.0.1"),
                Some("http://127.0.0.1:80"),
                None
            ),
            None,
            "default port"
        );
    }

    #[test]
    fn a_post_must_say_it_is_json() {
        let h = Some("127.0.0.1:8080");
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/x-ndjson",
            "application/merge-patch+json",
        ] {
            assert_eq!(refused(Method::POST, h, None, Some(ok)), None, "{ok}");
        }
        for bad in [
            Some("text/plain"),
            Some("text/plain; charset=utf-8"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("text/json+x"),
            None,
        ] {
            assert_eq!(refused(Method::POST, h, None, bad), Some(415), "{bad:?}");
        }
        assert_eq!(
            refused(Method::GET, h, None, None),
            None,
            "a GET has no body"
        );
    }
}
