//! The status page (`GET /`) in a real headless Chromium, driven over the DevTools
//! protocol: served by a running gateway with tokens, it asks for a token, then shows
//! a published row, its pool and an agent over it, and follows the registry by itself:
//! when the publisher stops, the row's and the agent's status turn `inactive` without
//! a reload.
//!
//! Needs `chromium` (Debian's package; or `$CHROMIUM`). Without it the test says so in
//! one loud line and passes, unless `VIRTUAL_LLM_REQUIRE_SERVICES=1`, where a missing
//! browser fails it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use headless_chrome::{Browser, LaunchOptions, Tab};
use virtual_llm::protocol::AgentSpec;
use virtual_llm::testkit::{SseTransport, TestGateway, token};
use virtual_llm::{Config, EchoProvider, LlmName, PublisherOptions};

/// The browser to drive: `$CHROMIUM`, or `chromium`, `chromium-browser`,
/// `google-chrome` on `PATH`.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

fn launch(path: PathBuf) -> Browser {
    let options = LaunchOptions::default_builder()
        .path(Some(path))
        .headless(true)
        // Tests run as root in CI containers, where Chromium's sandbox cannot start.
        .sandbox(false)
        .idle_browser_timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    Browser::new(options).unwrap()
}

/// The text of the first element matching `selector`, once there is one.
fn text(tab: &Tab, selector: &str) -> String {
    tab.wait_for_element(selector)
        .unwrap_or_else(|e| {
            let body = tab
                .evaluate("document.body.innerText", false)
                .ok()
                .and_then(|r| r.value);
            panic!("no {selector} on the page: {e}; the page shows {body:?}")
        })
        .get_inner_text()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_registry_live_in_chromium() {
    let Some(path) = chromium() else {
        if std::env::var("VIRTUAL_LLM_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!(
                "chromium is missing and VIRTUAL_LLM_REQUIRE_SERVICES=1: install Debian's chromium"
            );
        }
        eprintln!(
            "SKIPPED the_status_page_shows_the_registry_live_in_chromium: no chromium on PATH (install Debian's chromium, or set CHROMIUM)"
        );
        return;
    };
    let gw = TestGateway::start(Config::default()).await;
    let poet = AgentSpec {
        description: Some("Answers in verse".into()),
        ..AgentSpec::new(
            LlmName::parse("poet").unwrap(),
            LlmName::parse("demo").unwrap(),
        )
    };
    let publisher = gw
        .publish_with(
            &SseTransport,
            "alice",
            &["demo"],
            Arc::new(EchoProvider::new()),
            PublisherOptions {
                agents: vec![poet],
                ..PublisherOptions::default()
            },
        )
        .await;
    let url = format!("{}/?every=200", gw.url);

    let (browser, tab) = tokio::task::spawn_blocking(move || {
        let browser = launch(path);
        let tab = browser.new_tab().unwrap();
        tab.set_default_timeout(Duration::from_secs(20));
        tab.navigate_to(&url)
            .unwrap()
            .wait_until_navigated()
            .unwrap();
        // This gateway has tokens: the page says it needs one.
        let state = text(&tab, "#state.error");
        assert!(state.contains("not allowed"), "{state}");
        tab.wait_for_element("#token")
            .unwrap()
            .click()
            .unwrap()
            .type_into(&token("client"))
            .unwrap();
        tab.wait_for_element("#auth button")
            .unwrap()
            .click()
            .unwrap();
        assert_eq!(
            text(&tab, r#"#llms tr[data-name="demo"] td.status-active"#),
            "active"
        );
        assert_eq!(
            text(&tab, r#"#llms tr[data-name="demo"] td.model"#),
            "demo-model"
        );
        assert_eq!(text(&tab, r#"#pools tr[data-name="demo"] td.active"#), "1");
        assert_eq!(
            text(&tab, r#"#agents tr[data-name="poet"] td.status-active"#),
            "active"
        );
        (browser, tab)
    })
    .await
    .unwrap();

    // The publisher stops: the page, not reloaded, follows.
    publisher.stop().await;
    tokio::task::spawn_blocking(move || {
        assert_eq!(
            text(&tab, r#"#llms tr[data-name="demo"] td.status-inactive"#),
            "inactive"
        );
        assert_eq!(text(&tab, r#"#pools tr[data-name="demo"] td.active"#), "0");
        assert_eq!(
            text(&tab, r#"#agents tr[data-name="poet"] td.status-inactive"#),
            "inactive"
        );
        let state = text(&tab, "#state");
        assert!(state.starts_with("updated "), "{state}");
        drop(browser);
    })
    .await
    .unwrap();
}
