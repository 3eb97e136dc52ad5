//! Helpers shared by the command-line tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The repository's committed fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Every fixture's name, as `MANIFEST.json` lists them.
pub fn fixture_names() -> Vec<String> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("MANIFEST.json")).unwrap()).unwrap();
    manifest
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The shared real checkpoints beside the checkout.
pub fn shared_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models")
        .join(name)
}

/// Runs `hayate` with `args`.
pub fn hayate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hayate"))
        .args(args)
        .output()
        .expect("hayate runs")
}

/// Reads one tensor of a safetensors file as f32 (from F32 or I64 data) and its shape.
pub fn read_tensor(path: &Path, name: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let values = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    };
    (values, t.shape().to_vec())
}

/// Asserts that a command failed cleanly: exit code 1, one `error:` line
/// on stderr mentioning every `needle`, no panic.
pub fn assert_clean_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1, stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    for needle in needles {
        assert!(line.contains(needle), "error line lacks `{needle}`: {line}");
    }
}

/// `assert_clean_error`, plus: the error is one line, the last thing printed.
pub fn assert_one_error_line(out: &Output, needles: &[&str]) {
    assert_clean_error(out, needles);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error_lines = stderr.lines().filter(|l| l.starts_with("error:")).count();
    assert_eq!(error_lines, 1, "expected one error line: {stderr}");
    let last = stderr.trim_end().lines().last().unwrap_or("");
    assert!(
        last.starts_with("error:"),
        "the error is not one line at the end of stderr: {stderr}"
    );
    // Shown with `--nocapture`, to review the messages.
    eprintln!("{last}");
}

/// The arguments of `hayate logits` for `model`, `tokens` and `out`, then `extra`.
pub fn logits_args<'a>(
    model: &'a Path,
    tokens: &'a str,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        tokens,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

/// Copies a fixture directory into a fresh temporary directory.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Splits a safetensors file into its JSON header and its data.
pub fn read_raw(path: &Path) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header.as_object().unwrap().clone(), bytes[8 + n..].to_vec())
}

/// Writes a safetensors file from a header and data, padding the header to a
/// multiple of 8 bytes and giving the length prefix its true length.
pub fn write_raw(path: &Path, header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) {
    let mut json = serde_json::to_vec(header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// Runs `hayate chat` with `args`, typing `input` on stdin.
pub fn chat(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_hayate"))
        .arg("chat")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("hayate runs");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// The prompt tokens each chat turn prefilled, from its `[N ...` stats lines.
pub fn prefilled_per_turn(stderr: &str) -> Vec<usize> {
    stderr
        .lines()
        .filter_map(|l| l.split_once('[')?.1.split(' ').next()?.parse().ok())
        .collect()
}

/// `hayate serve` on a free port; killed when dropped.
pub struct Server {
    /// The server process.
    pub child: Child,
    /// Where it listens on loopback.
    pub port: u16,
}

impl Server {
    /// Serves `model` with `extra` arguments once it announces its address.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hayate"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("hayate serve starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut said = Vec::new();
        let port = loop {
            let Some(line) = lines.next() else {
                panic!("the server ended: {said:?}");
            };
            let line = line.unwrap();
            if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
                break rest.split('/').next().unwrap().parse().unwrap();
            }
            said.push(line);
        };
        // Keep reading stderr so that the server never blocks on it.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, port }
    }

    /// Status and body of one request.
    pub fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        request(self.port, method, path, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status and body of one request to the server on `port`.
pub fn request(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply[9..12].parse().unwrap();
    (status, reply.split_once("\r\n\r\n").unwrap().1.to_owned())
}
