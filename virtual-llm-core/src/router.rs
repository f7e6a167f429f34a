//! The router: which rows may answer a request, in the order to try them.
//!
//! It is the one place a request's row is chosen. Today a model name is one row; pools
//! (several rows serving one model), agents, access rules and cooldowns change only
//! the [`Router`]. The gateway tries the candidates in order and moves on to the next
//! only when a row is [`Unavailable`](crate::Error::Unavailable) with a kind that
//! [allows it](crate::UnavailableKind::try_another).

use std::fmt;

use async_trait::async_trait;

use crate::{Error, LlmName, LlmRecord, Principal, Store};

/// Chooses the candidate rows for a request.
///
/// # Contract
/// - [`candidates`](Router::candidates) returns at least one row, best first, or an
///   error: [`Error::InvalidName`] for a model that breaks the name rules,
///   [`Error::UnknownLlm`] when nothing answers to it (also when the caller may not see
///   what does: it must not learn that it exists).
/// - It reads the registry through `store` and never writes it.
///
/// The test kit's `router_suite` (feature `testkit`) checks an implementation against
/// this contract.
#[async_trait]
pub trait Router: fmt::Debug + Send + Sync + 'static {
    /// The rows that may answer `principal`'s request for `model`, best first.
    async fn candidates(
        &self,
        store: &dyn Store,
        principal: &Principal,
        model: &str,
    ) -> Result<Vec<LlmRecord>, Error>;
}

/// The router of version 1: the model is a row name, and that row is the only
/// candidate.
#[derive(Clone, Copy, Debug, Default)]
pub struct NameRouter;

#[async_trait]
impl Router for NameRouter {
    async fn candidates(
        &self,
        store: &dyn Store,
        _principal: &Principal,
        model: &str,
    ) -> Result<Vec<LlmRecord>, Error> {
        let name = LlmName::parse(model)?;
        match store.get(&name).await? {
            Some(row) => Ok(vec![row]),
            None => Err(Error::UnknownLlm {
                name: model.to_owned(),
            }),
        }
    }
}
