//! Wake and sleep recipes in a config file (SPEC §12): `{"command": [...]}` or `{"url",
//! "method", "headers", "body"}`, as the reference publisher's provider entries and the
//! reference gateway's `[[wake]]` tables write them.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use virtual_llm::CommandRecipe;
use virtual_llm::Recipe;
use virtual_llm::openai::UrlRecipe;

/// A wake or sleep recipe: `{"command": [...]}` or `{"url", "method", "headers",
/// "body"}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RecipeConfig {
    /// The program and its arguments, run without a shell.
    pub(crate) command: Option<Vec<String>>,
    /// The URL to call.
    pub(crate) url: Option<String>,
    /// Its method; default `POST`.
    pub(crate) method: Option<String>,
    /// Headers sent with it.
    pub(crate) headers: Option<BTreeMap<String, String>>,
    /// A string sent as it is, or anything else sent as JSON.
    pub(crate) body: Option<serde_json::Value>,
}

/// A recipe of a config entry, or why not in one line naming it (`wake`, `sleep`).
pub(crate) fn recipe(what: &str, c: &RecipeConfig) -> Result<Arc<dyn Recipe>, String> {
    let bad = |e: &dyn std::fmt::Display| format!("{what}: {e}");
    match (&c.command, &c.url) {
        (Some(argv), None) => {
            if c.method.is_some() || c.headers.is_some() || c.body.is_some() {
                return Err(bad(&"method, headers and body go with url, not command"));
            }
            Ok(Arc::new(
                CommandRecipe::new(argv.clone()).map_err(|e| bad(&e))?,
            ))
        }
        (None, Some(url)) => {
            let mut recipe =
                UrlRecipe::new(c.method.as_deref().unwrap_or("POST"), url).map_err(|e| bad(&e))?;
            for (name, value) in c.headers.iter().flatten() {
                recipe = recipe.with_header(name, value).map_err(|e| bad(&e))?;
            }
            if let Some(body) = &c.body {
                recipe = recipe.with_body(body.clone());
            }
            Ok(Arc::new(recipe))
        }
        (Some(_), Some(_)) => Err(bad(&"either command or url, not both")),
        (None, None) => Err(bad(&"needs a command or a url")),
    }
}
