//! `hayate chat`'s agent loop end to end: the real binary, the real
//! pystd-qwen3-7m model, and a small MCP server over stdio written for
//! these tests (`tests/mcp/calc_server.py`, one tool `add`).

mod common;

use common::{assert_one_error_line, shared_model};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn calc_server() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/mcp/calc_server.py");
    format!("python3 '{}'", script.display())
}

/// Runs `hayate chat` with `args`, `input` on stdin, and the test server's
/// call log at `log`.
fn chat(args: &[&str], input: &str, log: &Path) -> Output {
    let model = shared_model("pystd-qwen3-7m");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hayate"))
        .arg("chat")
        .args(["--model", model.to_str().unwrap(), "--max-tokens", "40"])
        .args(["--threads", "1", "--seed", "7"])
        .args(args)
        .env("CALC_SERVER_LOG", log)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hayate runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The calls the test server received.
fn received(log: &Path) -> Vec<Value> {
    match std::fs::read_to_string(log) {
        Ok(text) => text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The prompts `--verbose-prompt` printed.
fn prompts(stderr: &str) -> Vec<&str> {
    stderr
        .split("--- prompt ---\n")
        .skip(1)
        .map(|p| p.split("\n--- end of prompt ---").next().unwrap())
        .collect()
}

fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    (dir, path)
}

#[test]
fn a_forced_call_runs_on_the_mcp_server_and_its_result_reaches_the_model() {
    let (_dir, log) = scratch("calls.jsonl");
    let server = calc_server();
    let out = chat(
        &[
            "--mcp",
            &server,
            "--yes",
            "--tool-choice",
            "required",
            "--verbose-prompt",
        ],
        "What is 2 plus 3?\n",
        &log,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("Tools: add (hermes syntax)"), "{stderr}");
    // The server received one call, with arguments its schema allows.
    let calls = received(&log);
    assert_eq!(calls.len(), 1, "{stderr}");
    assert_eq!(calls[0]["name"], "add");
    let (a, b) = (
        calls[0]["arguments"]["a"].as_i64().expect("integer a"),
        calls[0]["arguments"]["b"].as_i64().expect("integer b"),
    );
    assert!((0..=99).contains(&a) && (0..=99).contains(&b), "{calls:?}");
    assert_eq!(calls[0]["arguments"].as_object().unwrap().len(), 2);
    let result = format!("SUM-RESULT {}", a + b);
    assert!(
        stderr.contains(&format!("[tool result] {result}")),
        "{stderr}"
    );
    // The tool was offered to the model, and the second reply's prompt holds
    // the call and the server's result, as the template renders them.
    let prompts = prompts(&stderr);
    assert_eq!(prompts.len(), 2, "{stderr}");
    assert!(prompts[0].contains("\"name\":\"add\""), "{}", prompts[0]);
    assert!(prompts[1].starts_with(prompts[0]), "{}", prompts[1]);
    let call = format!("<tool_call>\n{}\n</tool_call>", calls[0]);
    assert!(
        prompts[1].contains(&call.replace(": ", ":").replace(", ", ",")),
        "{}",
        prompts[1]
    );
    assert!(
        prompts[1].contains(&format!("<tool_response>\n{result}\n</tool_response>")),
        "{}",
        prompts[1]
    );
    // The second reply is the model's answer (auto after the first), and
    // only what follows the first prompt is prefilled for it.
    let prefilled: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix('['))
        .filter_map(|l| l.split_once(" new prompt tok"))
        .map(|(n, _)| n.parse().unwrap())
        .collect();
    assert_eq!(prefilled.len(), 2, "{stderr}");
    assert!(prefilled[1] < prefilled[0], "{prefilled:?}");
}

#[test]
fn without_yes_a_call_runs_only_when_the_user_agrees() {
    let server = calc_server();
    for (answer, runs) in [("n", false), ("y", true)] {
        let (_dir, log) = scratch("calls.jsonl");
        let out = chat(
            &["--mcp", &server, "--tool-choice", "add"],
            &format!("Add 4 and 5.\n{answer}\n"),
            &log,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("Run add? [y/N]"), "{stderr}");
        assert_eq!(
            received(&log).len(),
            usize::from(runs),
            "{answer}: {stderr}"
        );
        assert_eq!(
            stderr.contains("[tool error] The user declined to run this call."),
            !runs,
            "{stderr}"
        );
    }
}

#[test]
fn tools_from_a_file_are_offered_and_their_calls_printed_not_run() {
    let (dir, log) = scratch("calls.jsonl");
    let file = dir.path().join("tools.json");
    std::fs::write(
        &file,
        r#"[{"type": "function", "function": {"name": "lookup", "description": "Find a word.",
            "parameters": {"type": "object", "properties": {"word": {"type": "string", "enum": ["alpha", "beta"]}},
            "required": ["word"], "additionalProperties": false}}}]"#,
    )
    .unwrap();
    let server = calc_server();
    let out = chat(
        &[
            "--tools",
            file.to_str().unwrap(),
            "--mcp",
            &server,
            "--tool-choice",
            "lookup",
            "--verbose-prompt",
        ],
        "Look up a word.\n",
        &log,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("Tools: add, lookup"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let printed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("[tool call] lookup "))
        .collect();
    assert_eq!(printed.len(), 1, "{stdout}");
    let arguments: Value = serde_json::from_str(printed[0]).unwrap();
    assert!(
        arguments == serde_json::json!({"word": "alpha"})
            || arguments == serde_json::json!({"word": "beta"}),
        "{arguments}"
    );
    // Nothing ran, and with no result there is no second reply.
    assert!(received(&log).is_empty());
    assert_eq!(prompts(&stderr).len(), 1, "{stderr}");
}

#[test]
fn servers_and_tool_files_that_cannot_be_used_are_clear_errors() {
    let (dir, log) = scratch("calls.jsonl");
    let missing = chat(&["--mcp", "/nonexistent/mcp-server --flag"], "", &log);
    assert_one_error_line(&missing, &["/nonexistent/mcp-server", "cannot start"]);
    let quits = chat(&["--mcp", "python3 -c pass"], "", &log);
    assert_one_error_line(&quits, &["python3 -c pass", "initialize"]);
    let unbalanced = chat(&["--mcp", "python3 'unclosed"], "", &log);
    assert_one_error_line(&unbalanced, &["cannot split"]);
    let server = calc_server();
    let unknown = chat(&["--mcp", &server, "--tool-choice", "subtract"], "", &log);
    assert_one_error_line(&unknown, &["subtract", "not auto, none, required"]);
    let no_tools = chat(&["--tool-choice", "required"], "", &log);
    assert_one_error_line(&no_tools, &["--tool-choice needs tools"]);
    let file = dir.path().join("tools.json");
    for (text, needle) in [
        ("{\"name\": \"x\"}", "expected an array"),
        (
            "[{\"type\": \"function\", \"function\": {}}]",
            "needs a `name`",
        ),
        ("[{\"name\": \"x\", \"parameters\": 3}]", "`parameters`"),
        ("[{\"name\": \"add\"}]", "two tools are named `add`"),
        ("[1, 2", "not JSON"),
    ] {
        std::fs::write(&file, text).unwrap();
        let out = chat(
            &["--mcp", &server, "--tools", file.to_str().unwrap()],
            "",
            &log,
        );
        assert_one_error_line(&out, &[needle]);
    }
    assert!(received(&log).is_empty());
}
