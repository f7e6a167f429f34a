//! Virtual agents (SPEC §13): a persona over a published model — a system prompt, a
//! description, default sampling parameters — published in the same register as the
//! model it speaks through.
//!
//! An agent is stored as a row of the registry (a virtual [`LlmRecord`] whose
//! [`agent`](LlmRecord::agent) is set), so it shares the names namespace, ownership,
//! compare-and-set batches and the session lifecycle with the LLMs for free. It is never
//! a pool member and never answers a task itself: the [`Router`](crate::Router)
//! resolves an agent's name into its model's route with the agent's [`Persona`], and
//! the relay applies the persona to the request ([`Persona::apply`]) before it goes
//! through the pool, the queue and wake like any other request.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::access::Access;
use crate::{Error, Gateway, LlmName, LlmRecord, LlmStatus, Principal};

/// Longest `systemPrompt` accepted in a register, in bytes (64 KiB).
pub const MAX_SYSTEM_PROMPT_BYTES: usize = 64 * 1024;
/// Longest `description` accepted in a register, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 1024;
/// Largest `defaultParams` accepted in a register, in bytes of its JSON (16 KiB).
pub const MAX_DEFAULT_PARAMS_BYTES: usize = 16 * 1024;
/// Most agents one register may carry.
pub const MAX_AGENTS_PER_REGISTER: usize = 64;
/// The request fields `defaultParams` may not hold: they are the request itself, not
/// its sampling parameters.
const RESERVED_PARAMS: [&str; 3] = ["model", "messages", "stream"];
/// The `type` an agent's row carries.
pub const AGENT_TYPE: &str = "agent";

/// One agent of a register: `{name, llm, description?, systemPrompt?, defaultParams?}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Its name, in the names namespace (the same rules as an LLM's).
    pub name: LlmName,
    /// What it speaks through: the name or pool key of an LLM of the same register.
    pub llm: LlmName,
    /// What it is for, for people and MCP clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Sent first, before the client's own system messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// OpenAI request fields under their own names (`temperature`, `max_tokens`…),
    /// filled in where the client gave none: the one place where keys are not
    /// camelCase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub default_params: Option<Map<String, Value>>,
    /// Who may see and call it (SPEC §16); absent: public.
    #[serde(default, skip_serializing_if = "Access::is_public")]
    pub access: Access,
}

impl AgentSpec {
    /// An agent named `name` speaking through `llm`, with nothing else.
    pub fn new(name: LlmName, llm: LlmName) -> Self {
        AgentSpec {
            name,
            llm,
            description: None,
            system_prompt: None,
            default_params: None,
            access: Access::Public,
        }
    }

    /// Checks the hostile-input bounds: the description's and system prompt's sizes and
    /// characters, and `defaultParams`' size and keys.
    pub fn validate(&self) -> Result<(), Error> {
        let name = &self.name;
        self.access.validate()?;
        if let Some(d) = &self.description {
            if d.chars().count() > MAX_DESCRIPTION_CHARS {
                return Err(Error::invalid(format!(
                    "the description of agent {name} is at most {MAX_DESCRIPTION_CHARS} characters"
                )));
            }
            if d.chars().any(|c| c.is_control() && c != '\n') {
                return Err(Error::invalid(format!(
                    "the description of agent {name} must not contain control characters"
                )));
            }
        }
        if let Some(p) = &self.system_prompt
            && p.len() > MAX_SYSTEM_PROMPT_BYTES
        {
            return Err(Error::invalid(format!(
                "the systemPrompt of agent {name} is at most {MAX_SYSTEM_PROMPT_BYTES} bytes"
            )));
        }
        if let Some(params) = &self.default_params {
            let size = serde_json::to_vec(params).map_or(usize::MAX, |v| v.len());
            if size > MAX_DEFAULT_PARAMS_BYTES {
                return Err(Error::invalid(format!(
                    "the defaultParams of agent {name} are at most {MAX_DEFAULT_PARAMS_BYTES} bytes of JSON"
                )));
            }
            if let Some(key) = RESERVED_PARAMS.iter().find(|k| params.contains_key(**k)) {
                return Err(Error::invalid(format!(
                    "the defaultParams of agent {name} may not set {key}"
                )));
            }
        }
        Ok(())
    }

    /// The persona the agent's row keeps.
    pub fn persona(&self) -> Persona {
        Persona {
            llm: self.llm.clone(),
            description: self.description.clone(),
            system_prompt: self.system_prompt.clone(),
            default_params: self.default_params.clone(),
        }
    }
}

/// What an agent's row keeps of it: everything of its [`AgentSpec`] but the name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Persona {
    /// The name or pool key of the LLM it speaks through.
    pub llm: LlmName,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Sent first, before the client's own system messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Request fields filled in where the client gave none (keys as OpenAI names them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_params: Option<Map<String, Value>>,
}

impl Persona {
    /// `body`, an OpenAI chat-completions request for the agent, made the request its
    /// model gets: `model` names the agent's LLM, the system prompt comes first (before
    /// the client's own system messages), and each default parameter is set where the
    /// client gave none (absent or `null`). A body that is not an object is left as it
    /// is (the model answers it as it would).
    ///
    /// ```
    /// use serde_json::json;
    /// use virtual_llm_core::{LlmName, agent::Persona};
    ///
    /// let persona = Persona {
    ///     llm: LlmName::parse("llama").unwrap(),
    ///     description: None,
    ///     system_prompt: Some("You are terse.".into()),
    ///     default_params: json!({"temperature": 0.2, "max_tokens": 64}).as_object().cloned(),
    /// };
    /// let mut body = json!({
    ///     "model": "terse",
    ///     "temperature": 0.9,
    ///     "messages": [{"role": "system", "content": "Answer in French."},
    ///                  {"role": "user", "content": "hi"}],
    /// });
    /// persona.apply(&mut body);
    /// assert_eq!(body["model"], "llama");
    /// assert_eq!(body["messages"][0], json!({"role": "system", "content": "You are terse."}));
    /// assert_eq!(body["messages"][1]["content"], "Answer in French.");
    /// assert_eq!(body["temperature"], 0.9, "the client's own value wins");
    /// assert_eq!(body["max_tokens"], 64);
    /// ```
    pub fn apply(&self, body: &mut Value) {
        let Some(request) = body.as_object_mut() else {
            return;
        };
        request.insert("model".to_owned(), Value::String(self.llm.to_string()));
        if let Some(prompt) = &self.system_prompt {
            let system = serde_json::json!({"role": "system", "content": prompt});
            match request.get_mut("messages") {
                Some(Value::Array(messages)) => messages.insert(0, system),
                Some(_) => {}
                None => {
                    request.insert("messages".to_owned(), Value::Array(vec![system]));
                }
            }
        }
        if let Some(params) = &self.default_params {
            for (key, value) in params {
                match request.get(key) {
                    None | Some(Value::Null) => {
                        request.insert(key.clone(), value.clone());
                    }
                    Some(_) => {}
                }
            }
        }
    }
}

/// The public view of an agent: `GET /api/v1/agents` and `GET /api/v1/agents/{name}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    /// Its name: the `model` clients call it by.
    pub name: LlmName,
    /// The name or pool key of the LLM it speaks through.
    pub llm: LlmName,
    /// What it is for.
    #[serde(default)]
    pub description: Option<String>,
    /// `active` only while its publisher is connected and its LLM is active;
    /// `hibernating` while its LLM sleeps; else `inactive`.
    pub status: LlmStatus,
}

/// The status an agent shows: its row's own (the session's lifecycle) unless that is
/// active, and then its model's: `active` when a member of its LLM's pool (or the row
/// it pins) is active, else `hibernating` when one sleeps, else `inactive`. `model` is
/// what the agent's `llm` resolves to.
pub fn agent_status<'a>(
    row: &LlmRecord,
    model: impl IntoIterator<Item = &'a LlmRecord>,
) -> LlmStatus {
    if row.status != LlmStatus::Active {
        return row.status;
    }
    let model = model.into_iter().filter(|r| r.agent.is_none());
    let mut status = LlmStatus::Inactive;
    for r in model {
        match r.status {
            LlmStatus::Active => return LlmStatus::Active,
            LlmStatus::Hibernating => status = LlmStatus::Hibernating,
            LlmStatus::Inactive => {}
        }
    }
    status
}

/// The view of the agent row `row` (whose [`agent`](LlmRecord::agent) is set) with
/// `status`; `None` for an LLM's row.
pub fn view(row: &LlmRecord, status: LlmStatus) -> Option<AgentView> {
    let persona = row.agent.as_ref()?;
    Some(AgentView {
        name: row.name.clone(),
        llm: persona.llm.clone(),
        description: persona.description.clone(),
        status,
    })
}

/// The views of the agent rows `agents`, each with the status [`agent_status`] gives
/// it against `rows` (the registry, or as much of it as holds the agents' LLMs). One
/// pass over `rows`, then one look-up per agent.
pub(crate) fn agent_views<'a>(
    agents: impl Iterator<Item = &'a LlmRecord>,
    rows: &[LlmRecord],
) -> Vec<AgentView> {
    // The rows of each pool key, and each LLM row by name.
    let mut pools: HashMap<&LlmName, Vec<&LlmRecord>> = HashMap::new();
    let mut named: HashMap<&LlmName, &LlmRecord> = HashMap::new();
    for r in rows.iter().filter(|r| !r.is_agent()) {
        pools.entry(r.pool_key()).or_default().push(r);
        named.insert(&r.name, r);
    }
    agents
        .filter_map(|agent| {
            let persona = agent.agent.as_ref()?;
            let status = match pools.get(&persona.llm) {
                Some(pool) => agent_status(agent, pool.iter().copied()),
                None => agent_status(agent, named.get(&persona.llm).copied()),
            };
            view(agent, status)
        })
        .collect()
}

impl Gateway {
    /// Every agent `principal` may see (SPEC §16), as clients see it (`GET
    /// /api/v1/agents`), ordered by name. An agent's status counts only the members
    /// of its LLM that admit `principal`: the ones its requests would go to.
    pub async fn agents(&self, principal: &Principal) -> Result<Vec<AgentView>, Error> {
        let mut rows = self.shared.store.list().await?;
        rows.retain(|r| r.admits(principal));
        Ok(agent_views(rows.iter().filter(|r| r.is_agent()), &rows))
    }

    /// One agent, as clients see it; 400 for a bad name, 404 when no agent has it or
    /// `principal` may not see it.
    pub async fn agent(&self, principal: &Principal, name: &str) -> Result<AgentView, Error> {
        let name = LlmName::parse(name)?;
        let unknown = || Error::UnknownLlm {
            name: name.to_string(),
        };
        let row = self.shared.store.get(&name).await?.ok_or_else(unknown)?;
        if !row.admits(principal) {
            return Err(unknown());
        }
        let persona = row.agent.as_ref().ok_or_else(unknown)?;
        let mut model = self.shared.store.by_pool(&persona.llm).await?;
        model.retain(|r| !r.is_agent() && r.admits(principal));
        if model.is_empty() {
            model.extend(
                (self.shared.store.get(&persona.llm).await?).filter(|r| r.admits(principal)),
            );
        }
        view(&row, agent_status(&row, &model)).ok_or_else(unknown)
    }
}
