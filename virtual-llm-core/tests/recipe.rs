//! `CommandRecipe` running real programs: success on exit 0; a non-zero exit quoted as
//! its status and the last line of stderr; a program that is missing or killed; a
//! program that leaves something running with stderr open does not hold the recipe
//! up; dropping a run kills the program.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use virtual_llm_core::{CommandRecipe, Recipe, SessionId};

fn sh(script: &str) -> CommandRecipe {
    CommandRecipe::new(["sh", "-c", script]).unwrap()
}

#[tokio::test]
async fn exit_zero_is_success() {
    assert_eq!(CommandRecipe::new(["true"]).unwrap().run().await, Ok(()));
    assert_eq!(
        sh("echo chatter; echo warnings only >&2").run().await,
        Ok(()),
        "output does not matter, the status does"
    );
}

#[tokio::test]
async fn a_non_zero_exit_says_its_status_and_the_last_line_of_stderr() {
    assert_eq!(
        sh("echo first >&2; echo oops >&2; exit 3").run().await,
        Err("exit status 3: oops".to_owned())
    );
    assert_eq!(
        sh("echo 'Job for vllm.service failed.' >&2; printf '\\n\\n' >&2; exit 1")
            .run()
            .await,
        Err("exit status 1: Job for vllm.service failed.".to_owned()),
        "blank lines at the end are skipped"
    );
    assert_eq!(
        CommandRecipe::new(["false"]).unwrap().run().await,
        Err("exit status 1".to_owned()),
        "nothing on stderr"
    );
    let long = sh("head -c 100000 /dev/zero | tr '\\0' x >&2; exit 2")
        .run()
        .await
        .unwrap_err();
    assert!(long.starts_with("exit status 2: xxx"), "{long}");
    assert!(long.chars().count() < 300, "bounded: {} chars", long.len());
}

#[tokio::test]
async fn a_missing_program_says_so() {
    let message = CommandRecipe::new(["/nonexistent/wake-the-gpu", "--now"])
        .unwrap()
        .run()
        .await
        .unwrap_err();
    assert!(
        message.starts_with("cannot run /nonexistent/wake-the-gpu: "),
        "{message}"
    );
    assert!(
        !message.contains("--now"),
        "arguments are not quoted: {message}"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn a_killed_program_says_by_which_signal() {
    assert_eq!(
        sh("kill -9 $$").run().await,
        Err("killed by signal 9".to_owned())
    );
}

/// A command that starts a server in the background and exits leaves the server
/// holding its stderr: the recipe ends with the command, not with the server.
#[tokio::test]
async fn something_left_running_does_not_hold_the_recipe() {
    let started = std::time::Instant::now();
    assert_eq!(
        sh("sleep 5 & echo 'started in the background' >&2; exit 4")
            .run()
            .await,
        Err("exit status 4: started in the background".to_owned())
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "returned before the background sleep ended: {:?}",
        started.elapsed()
    );
}

/// Dropping a run (the publisher's ready timeout passed) kills the program.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn dropping_a_run_kills_the_program() {
    let pid_file = std::env::temp_dir().join(format!("vllm-recipe-{}", SessionId::generate()));
    let recipe = CommandRecipe::new([
        "sh",
        "-c",
        "echo $$ > \"$0.tmp\" && mv \"$0.tmp\" \"$0\" && exec sleep 30",
        pid_file.to_str().unwrap(),
    ])
    .unwrap();
    let run = tokio::spawn(async move { recipe.run().await });
    let pid = poll(|| std::fs::read_to_string(&pid_file).ok()).await;
    let proc_dir = std::path::PathBuf::from(format!("/proc/{}", pid.trim()));
    assert!(proc_dir.exists(), "it runs");
    run.abort();
    assert!(run.await.unwrap_err().is_cancelled());
    // Killed, and reaped by tokio's orphan reaper: its /proc entry goes away.
    poll(|| (!proc_dir.exists()).then_some(())).await;
    std::fs::remove_file(&pid_file).unwrap();
}

/// Polls an outside process's doing, for at most 20 s.
async fn poll<T>(mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "gave up waiting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
