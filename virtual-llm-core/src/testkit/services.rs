//! The rule for tests that need a real server (PostgreSQL, `nats-server`): they start
//! their own from the binaries on the machine, and when a binary is missing they are
//! skipped with one loud line on stderr, unless `VIRTUAL_LLM_REQUIRE_SERVICES=1` (which
//! CI sets after installing them), where a missing binary fails the test. Each
//! service's starter (`virtual_llm_postgres::testing`, `virtual_llm_nats::testing`)
//! decides through [`missing`].

/// The environment variable that makes a missing service a failure.
pub const REQUIRE_SERVICES: &str = "VIRTUAL_LLM_REQUIRE_SERVICES";

/// Whether missing services fail the run (`VIRTUAL_LLM_REQUIRE_SERVICES=1`).
pub fn services_required() -> bool {
    std::env::var(REQUIRE_SERVICES).is_ok_and(|v| v == "1")
}

/// `service` is not installed here (`why` says what is missing and how to install
/// it): one loud line on stderr, so the caller's test returns; or, when `required`
/// (see [`services_required`]), a panic that fails it.
pub fn missing(service: &str, why: &str, required: bool) {
    if required {
        panic!("this test needs {service}, which is missing ({why}), and {REQUIRE_SERVICES}=1");
    }
    eprintln!(
        "SKIPPED: this test needs {service} ({why}); set {REQUIRE_SERVICES}=1 to make this a \
         failure"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_service_skips_unless_required() {
        missing("a server", "not installed", false);
        let required = std::panic::catch_unwind(|| missing("a server", "not installed", true));
        assert!(
            required.is_err(),
            "a required service that is missing fails"
        );
    }
}
