//! Authentication: a bearer token becomes a [`Principal`] with roles, through the
//! [`Authenticator`] a gateway supplies. Every route asks it first.

use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use subtle::ConstantTimeEq;

use crate::Error;
use crate::limits::Limits;

/// What a principal may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Register LLMs, open channels, heartbeat, post results.
    Publisher,
    /// List LLMs and call them.
    Client,
    /// Every role, and public LLMs. An admin that publishes owns its rows like
    /// anyone else: it cannot take or touch another principal's rows.
    Admin,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Stable identity; rows are owned by it.
    pub id: String,
    roles: Vec<Role>,
    /// Pools whose owner lets this principal's rows join them (SPEC §10).
    pools: Vec<String>,
    /// Its own limits (SPEC §16), over the gateway's defaults; `None`: the defaults.
    limits: Option<Limits>,
}

impl Principal {
    /// A principal with these roles.
    pub fn new(id: impl Into<String>, roles: impl IntoIterator<Item = Role>) -> Self {
        Principal {
            id: id.into(),
            roles: roles.into_iter().collect(),
            pools: Vec::new(),
            limits: None,
        }
    }

    /// The same principal with limits of its own (a token's `limits = {…}`), over the
    /// gateway's defaults ([`Config::limits`](crate::Config::limits)).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Its limits: its own, each absent one taken from `defaults`. An admin is bound
    /// only by limits its own token sets: the defaults (`maxNames` and `maxSessions`
    /// included) are not an admin's, so an open gateway's one principal
    /// ([`OpenAccess`]) publishes as many names as it likes.
    pub fn limits(&self, defaults: &Limits) -> Limits {
        let own = self.limits.clone().unwrap_or_default();
        if self.has(Role::Admin) {
            return Limits {
                max_names: own.max_names.or(Some(usize::MAX)),
                max_sessions: own.max_sessions.or(Some(usize::MAX)),
                ..own
            };
        }
        own.or(defaults)
    }

    /// The same principal, granted to join these pools with rows of its own although
    /// another principal owns them (a token's `pools = [...]`).
    pub fn with_pools(mut self, pools: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.pools = pools.into_iter().map(Into::into).collect();
        self
    }

    /// Whether its rows may join `pool` when another principal owns it: granted by
    /// name, or an admin.
    pub fn may_join(&self, pool: &str) -> bool {
        self.roles.contains(&Role::Admin) || self.pools.iter().any(|p| p == pool)
    }

    /// Whether it holds `role` (admins hold every role).
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role) || self.roles.contains(&Role::Admin)
    }

    /// `Ok` if it holds `role`, else 403 naming the action.
    pub fn require(&self, role: Role) -> Result<(), Error> {
        if self.has(role) {
            Ok(())
        } else {
            let action = match role {
                Role::Publisher => "publish",
                Role::Client => "call llms",
                Role::Admin => "administer the gateway",
            };
            Err(Error::Forbidden { action })
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header value (scheme matched
/// without regard to case); `None` for any other header.
///
/// ```
/// assert_eq!(virtual_llm_core::bearer_token("Bearer abc"), Some("abc"));
/// assert_eq!(virtual_llm_core::bearer_token("Basic abc"), None);
/// ```
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Turns the bearer token of a request into a principal.
///
/// # Contract
/// - `None` (no `Authorization` header) and unknown tokens are
///   [`Error::Unauthenticated`], unless the authenticator deliberately admits anonymous
///   callers ([`OpenAccess`]).
/// - The same token always yields the same principal id: rows are owned by it.
/// - It must not leak, through its errors or timing, which tokens exist.
#[async_trait]
pub trait Authenticator: fmt::Debug + Send + Sync + 'static {
    /// The principal behind `bearer`.
    async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, Error>;
}

/// Admits everyone as one principal, `anonymous`, with every role. Only for a gateway
/// listening on loopback (the reference gateway refuses anything else without tokens).
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenAccess;

#[async_trait]
impl Authenticator for OpenAccess {
    async fn authenticate(&self, _bearer: Option<&str>) -> Result<Principal, Error> {
        Ok(Principal::new("anonymous", [Role::Admin]))
    }
}

/// A fixed table of tokens, e.g. from a config file.
#[derive(Clone, Default)]
pub struct StaticTokens {
    tokens: HashMap<String, Principal>,
}

impl fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the tokens themselves.
        f.debug_struct("StaticTokens")
            .field("principals", &self.tokens.len())
            .finish()
    }
}

impl StaticTokens {
    /// An empty table: every request is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token for `principal`.
    pub fn with(mut self, token: impl Into<String>, principal: Principal) -> Self {
        self.tokens.insert(token.into(), principal);
        self
    }
}

#[async_trait]
impl Authenticator for StaticTokens {
    async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, Error> {
        let token = bearer.ok_or(Error::Unauthenticated)?;
        // Compare against every token, each in constant time (`subtle`), so the answer
        // time does not reveal how much of a guess was right. (A token of another
        // length is told apart at once: lengths are not secret.)
        let mut found = None;
        for (known, principal) in &self.tokens {
            if bool::from(known.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(principal);
            }
        }
        found.cloned().ok_or(Error::Unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_tokens_map_to_principals_and_refuse_the_rest() {
        let auth = StaticTokens::new()
            .with("pub-token", Principal::new("alice", [Role::Publisher]))
            .with("cli-token", Principal::new("bob", [Role::Client]));
        let alice = auth.authenticate(Some("pub-token")).await.unwrap();
        assert_eq!(alice.id, "alice");
        assert!(alice.require(Role::Publisher).is_ok());
        assert_eq!(alice.require(Role::Client).unwrap_err().status(), 403);
        for bad in [None, Some(""), Some("pub-toke"), Some("pub-token ")] {
            assert_eq!(auth.authenticate(bad).await.unwrap_err().status(), 401);
        }
        assert!(
            !format!("{auth:?}").contains("pub-token"),
            "tokens must not be printed"
        );
    }

    #[tokio::test]
    async fn only_the_exact_token_matches() {
        let token = "tok-0123456789abcdef";
        let auth = StaticTokens::new()
            .with(token, Principal::new("alice", [Role::Publisher]))
            .with(
                "tok-0123456789abcdeg",
                Principal::new("bob", [Role::Client]),
            );
        assert_eq!(auth.authenticate(Some(token)).await.unwrap().id, "alice");
        let mut last_byte_off = token.to_owned();
        last_byte_off.replace_range(token.len() - 1.., "e");
        let mut first_byte_off = token.to_owned();
        first_byte_off.replace_range(..1, "T");
        for bad in [
            last_byte_off.as_str(),
            first_byte_off.as_str(),
            &token[..token.len() - 1],
            &format!("{token}f"),
            &format!("{token}\0"),
            "tok-0123456789abcdeé",
        ] {
            assert_eq!(
                auth.authenticate(Some(bad)).await.unwrap_err().status(),
                401,
                "{bad:?} matched"
            );
        }
        assert_eq!(
            auth.authenticate(Some("tok-0123456789abcdeg"))
                .await
                .unwrap()
                .id,
            "bob",
            "a token one byte from another is its own"
        );
    }

    #[tokio::test]
    async fn an_empty_table_refuses_everyone() {
        let auth = StaticTokens::new();
        for bearer in [None, Some(""), Some("anything")] {
            assert_eq!(auth.authenticate(bearer).await.unwrap_err().status(), 401);
        }
    }

    #[test]
    fn limits_overlay_the_defaults_except_for_admins() {
        let defaults = Limits {
            requests_per_minute: Some(10),
            max_names: Some(3),
            ..Limits::default()
        };
        let own = Limits {
            max_concurrent: Some(2),
            ..Limits::default()
        };
        let bob = Principal::new("bob", [Role::Client]).with_limits(own.clone());
        let limits = bob.limits(&defaults);
        assert_eq!(
            (
                limits.requests_per_minute,
                limits.max_concurrent,
                limits.max_names()
            ),
            (Some(10), Some(2), 3)
        );
        let plain = Principal::new("eve", [Role::Publisher]).limits(&Limits::default());
        assert_eq!((plain.max_names(), plain.max_sessions()), (256, 64));
        let root = Principal::new("root", [Role::Admin]);
        let limits = root.limits(&defaults);
        assert_eq!(
            limits.requests_per_minute, None,
            "no default binds an admin"
        );
        assert_eq!(limits.max_names(), usize::MAX);
        let root = root.with_limits(own);
        assert_eq!(root.limits(&defaults).max_concurrent, Some(2), "its own do");
    }

    #[test]
    fn admins_hold_every_role() {
        let admin = Principal::new("root", [Role::Admin]);
        assert!(admin.has(Role::Publisher) && admin.has(Role::Client));
    }
}
