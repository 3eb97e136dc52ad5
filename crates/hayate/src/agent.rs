//! The tools of `hayate chat`'s agent loop: MCP servers started over stdio
//! (through `rmcp`), whose tools the model may call and this process runs,
//! and tools read from a JSON file, offered to the model but never run.

use anyhow::{Context, Result, bail};
use hayate_chat::tools::{Tool, ToolCall};
use rmcp::model::{CallToolRequestParams, ContentBlock};
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

/// Where an offered tool comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The MCP server at this index: its calls are run.
    Mcp(usize),
    /// A `--tools` file: its calls are only shown.
    File,
}

/// A tool offered to the model.
#[derive(Clone, Debug)]
pub struct OfferedTool {
    /// The function's name.
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// The JSON schema of its arguments.
    pub parameters: Value,
    /// Who runs it.
    pub source: Source,
}

/// One MCP server, connected.
struct McpServer {
    command: String,
    client: RunningService<RoleClient, ()>,
}

/// What a run call gave back.
pub struct CallResult {
    /// The result's text, as the model is shown it.
    pub text: String,
    /// The tool (or its server) reported an error.
    pub is_error: bool,
}

/// The tools of a chat session and the servers that run them.
pub struct Toolbox {
    runtime: tokio::runtime::Runtime,
    servers: Vec<McpServer>,
    tools: Vec<OfferedTool>,
    timeout: Duration,
}

impl Toolbox {
    /// Starts an MCP server for each command line in `commands` (split as a
    /// shell would) and lists its tools, then adds the tools of `file`.
    /// A tool name offered twice is an error naming both sources.
    pub fn start(commands: &[String], file: Option<&Path>, timeout: Duration) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime for MCP servers")?;
        let mut toolbox = Toolbox {
            runtime,
            servers: Vec::new(),
            tools: Vec::new(),
            timeout,
        };
        for command in commands {
            toolbox.connect(command)?;
        }
        if let Some(path) = file {
            for tool in read_tools_file(path)? {
                toolbox.add(tool)?;
            }
        }
        Ok(toolbox)
    }

    fn connect(&mut self, command: &str) -> Result<()> {
        let words = shell_words::split(command)
            .with_context(|| format!("--mcp `{command}`: cannot split the command line"))?;
        let Some((program, args)) = words.split_first() else {
            bail!("--mcp needs a command line");
        };
        let mut process = tokio::process::Command::new(program);
        process.args(args);
        let index = self.servers.len();
        let timeout = self.timeout;
        let (client, listed) = self.runtime.block_on(async {
            let transport = TokioChildProcess::new(process)
                .with_context(|| format!("cannot start the MCP server `{command}`"))?;
            let client = tokio::time::timeout(timeout, ().serve(transport))
                .await
                .with_context(|| {
                    format!("the MCP server `{command}` did not answer within {timeout:?}")
                })?
                .with_context(|| format!("the MCP server `{command}` failed to initialize"))?;
            let listed = tokio::time::timeout(timeout, client.list_all_tools())
                .await
                .with_context(|| {
                    format!("the MCP server `{command}` did not list its tools within {timeout:?}")
                })?
                .with_context(|| format!("the MCP server `{command}` cannot list its tools"))?;
            anyhow::Ok((client, listed))
        })?;
        self.servers.push(McpServer {
            command: command.to_owned(),
            client,
        });
        for tool in listed {
            self.add(OfferedTool {
                name: tool.name.to_string(),
                description: tool.description.map(|d| d.to_string()),
                parameters: Value::Object((*tool.input_schema).clone()),
                source: Source::Mcp(index),
            })?;
        }
        Ok(())
    }

    fn add(&mut self, tool: OfferedTool) -> Result<()> {
        if let Some(other) = self.tools.iter().find(|t| t.name == tool.name) {
            bail!(
                "two tools are named `{}`: from {} and from {}",
                tool.name,
                self.source_name(other.source),
                self.source_name(tool.source)
            );
        }
        self.tools.push(tool);
        Ok(())
    }

    /// Where tools of `source` come from, in words.
    pub fn source_name(&self, source: Source) -> String {
        match source {
            Source::Mcp(i) => format!("MCP server `{}`", self.servers[i].command),
            Source::File => "--tools".to_owned(),
        }
    }

    /// The tools offered.
    pub fn tools(&self) -> &[OfferedTool] {
        &self.tools
    }

    /// The tools as an OpenAI `tools` array, for the chat template.
    pub fn listing(&self) -> Value {
        self.tools
            .iter()
            .map(|t| {
                let mut function = json!({"name": t.name, "parameters": t.parameters});
                if let Some(d) = &t.description {
                    function["description"] = json!(d);
                }
                json!({"type": "function", "function": function})
            })
            .collect()
    }

    /// The tools as grammars take them.
    pub fn schemas(&self) -> Vec<Tool> {
        self.tools
            .iter()
            .map(|t| Tool {
                name: t.name.clone(),
                parameters: t.parameters.clone(),
            })
            .collect()
    }

    /// The offered tool `name`.
    pub fn find(&self, name: &str) -> Option<&OfferedTool> {
        self.tools.iter().find(|t| t.name == name)
    }

    /// Runs `call` on the MCP server of its tool. A failure of the tool or
    /// of its server is a result with `is_error`, for the model to see.
    pub fn run(&self, call: &ToolCall) -> CallResult {
        let failed = |text: String| CallResult {
            text,
            is_error: true,
        };
        let Some(tool) = self.find(&call.name) else {
            return failed(format!("error: there is no tool named `{}`", call.name));
        };
        let Source::Mcp(index) = tool.source else {
            return failed(format!("error: `{}` cannot be run here", call.name));
        };
        let server = &self.servers[index];
        let arguments = match &call.arguments {
            Value::Object(map) => map.clone(),
            _ => return failed("error: the arguments must be a JSON object".to_owned()),
        };
        let request = CallToolRequestParams::new(call.name.clone()).with_arguments(arguments);
        let answer = self.runtime.block_on(async {
            tokio::time::timeout(self.timeout, server.client.call_tool(request)).await
        });
        match answer {
            Err(_) => failed(format!(
                "error: `{}` did not answer within {:?}",
                call.name, self.timeout
            )),
            Ok(Err(e)) => failed(format!("error: the call failed: {e}")),
            Ok(Ok(result)) => {
                let mut parts: Vec<String> = result
                    .content
                    .iter()
                    .map(|block| match block {
                        ContentBlock::Text(t) => t.text.clone(),
                        ContentBlock::Image(i) => format!("[image, {}]", i.mime_type),
                        ContentBlock::Audio(a) => format!("[audio, {}]", a.mime_type),
                        ContentBlock::Resource(r) => {
                            serde_json::to_string(&r.resource).unwrap_or_default()
                        }
                        ContentBlock::ResourceLink(l) => format!("[resource {}]", l.uri),
                        _ => "[content of an unknown kind]".to_owned(),
                    })
                    .collect();
                if parts.is_empty()
                    && let Some(structured) = &result.structured_content
                {
                    parts.push(structured.to_string());
                }
                CallResult {
                    text: parts.join("\n"),
                    is_error: result.is_error.unwrap_or(false),
                }
            }
        }
    }

    /// Closes the connections; the servers exit.
    pub fn close(self) {
        let Toolbox {
            runtime, servers, ..
        } = self;
        runtime.block_on(async {
            for server in servers {
                if let Err(e) = server.client.cancel().await {
                    eprintln!("warning: MCP server `{}`: {e}", server.command);
                }
            }
        });
    }
}

/// The tools of a `--tools` file: an OpenAI `tools` array, each
/// `{"type": "function", "function": {...}}` or the function object itself
/// (`name`, `description`, `parameters`).
fn read_tools_file(path: &Path) -> Result<Vec<OfferedTool>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let Value::Array(entries) = value else {
        bail!("{}: expected an array of tools", path.display());
    };
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let at = || format!("{}: tool {i}", path.display());
            let function = match entry.get("type").and_then(Value::as_str) {
                Some("function") => entry
                    .get("function")
                    .with_context(|| format!("{}: needs `function`", at()))?,
                Some(other) => bail!("{}: type `{other}` is not `function`", at()),
                None => entry,
            };
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .with_context(|| format!("{}: needs a `name`", at()))?;
            let parameters = match function.get("parameters") {
                None => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => bail!("{}: `parameters` must be a JSON schema object", at()),
            };
            Ok(OfferedTool {
                name: name.to_owned(),
                description: function
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                parameters,
                source: Source::File,
            })
        })
        .collect()
}
