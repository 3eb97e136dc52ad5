use crate::{ChatError, Result};
use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::Serialize;

/// One turn of a conversation.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_owned(),
            content: content.to_owned(),
        }
    }
}

/// What a render takes besides the messages.
#[derive(Clone, Copy, Debug, Default)]
pub struct RenderOptions<'a> {
    /// End with the assistant's turn header.
    pub add_generation_prompt: bool,
    /// The tools offered (OpenAI's `tools` array), as templates take them.
    pub tools: Option<&'a serde_json::Value>,
    /// Further template variables (`chat_template_kwargs`, e.g. `enable_thinking`).
    pub extra: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// Instructions one render may execute: real templates need a few hundred
/// per message; a template that loops without end runs out instead.
const FUEL: u64 = 10_000_000;

/// Most bytes a render may produce (a prompt this long could not be run anyway).
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;

/// A writer that refuses to grow past [`MAX_OUTPUT_BYTES`].
#[derive(Default)]
struct Capped {
    out: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > MAX_OUTPUT_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A compiled Hugging Face chat template.
///
/// Templates come with downloaded models, so they are treated as untrusted:
/// a render executes at most 10 million (`FUEL`) instructions and produces at most
/// [`MAX_OUTPUT_BYTES`]; beyond that it is an error, not a hang.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source` with the environment `transformers` uses
    /// (`trim_blocks`, `lstrip_blocks`, `raise_exception`, `strftime_now`,
    /// Python string/list/dict methods).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| ChatError::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            source: source.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The template's source (to see which variables it reads, e.g. `tools`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`, ending with the assistant's turn header when
    /// `add_generation_prompt` is set.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(
            messages,
            &RenderOptions {
                add_generation_prompt,
                ..RenderOptions::default()
            },
        )
    }

    /// Renders any serializable conversation (messages as JSON objects, as
    /// an API receives them: tool calls, content parts, ...) with `options`.
    pub fn render_with(
        &self,
        messages: &(impl Serialize + ?Sized),
        options: &RenderOptions<'_>,
    ) -> Result<String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| ChatError::Template(e.to_string()))?;
        let mut out = Capped::default();
        let base = context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => options.add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            tools => options.tools.map(|t| Value::from(minijinja::value::Serde(t))),
        };
        // Extra variables (e.g. `enable_thinking`) cannot replace the ones above.
        let empty = serde_json::Map::new();
        let extra = Value::from(minijinja::value::Serde(options.extra.unwrap_or(&empty)));
        let rendered = template
            .render_captured_to(context! { ..base, ..extra }, &mut out)
            .map(drop);
        if out.overflowed {
            return Err(ChatError::Template(format!(
                "the output exceeds {} MiB",
                MAX_OUTPUT_BYTES >> 20
            )));
        }
        rendered.map_err(|e| ChatError::Template(e.to_string()))?;
        // The engine writes only the template's (UTF-8) strings.
        String::from_utf8(out.out).map_err(|e| ChatError::Template(e.to_string()))
    }
}

/// `strftime_now(format)` for templates that print today's date (UTC),
/// supporting the directives templates use.
fn strftime_now(format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let tod = secs.rem_euclid(86_400);
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &year.to_string(),
            Some('y') => out += &format!("{:02}", year % 100),
            Some('m') => out += &format!("{month:02}"),
            Some('d') => out += &format!("{day:02}"),
            Some('B') => out += month_name,
            Some('b') => out += &month_name[..3],
            Some('H') => out += &format!("{:02}", tod / 3600),
            Some('M') => out += &format!("{:02}", tod / 60 % 60),
            Some('S') => out += &format!("{:02}", tod % 60),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "",
            "<|im_end|>",
        )
        .unwrap();
        let s = t.render(&[Message::new("user", "hi")], true).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_and_exceptions_work() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  ok ")], false).unwrap(),
            "OK"
        );
        let err = t.render(&[Message::new("system", "x")], false).unwrap_err();
        assert!(err.to_string().contains("first must be user"));
    }

    #[test]
    fn json_messages_tools_and_extra_variables_reach_the_template() {
        let t = ChatTemplate::new(
            "{% if tools %}{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% endif %}\
             {% for m in messages %}{{ m.role }}:{% if m.tool_calls %}{{ m.tool_calls[0].function.name }}{% else %}{{ m.content }}{% endif %};{% endfor %}\
             {{ 'think' if enable_thinking else 'plain' }}|{{ add_generation_prompt }}",
            "",
            "",
        )
        .unwrap();
        let messages = serde_json::json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
        ]);
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
        let extra = serde_json::json!({"enable_thinking": true, "add_generation_prompt": false});
        let options = RenderOptions {
            add_generation_prompt: true,
            tools: Some(&tools),
            extra: extra.as_object(),
        };
        // The extra variables cannot override the render's own.
        assert_eq!(
            t.render_with(&messages, &options).unwrap(),
            "[f]user:hi;assistant:f;think|True"
        );
        let plain = RenderOptions::default();
        assert_eq!(
            t.render_with(&messages, &plain).unwrap(),
            "user:hi;assistant:f;plain|False"
        );
    }

    #[test]
    fn endless_and_huge_templates_are_errors() {
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("fuel"), "{err}");
        let t = ChatTemplate::new(
            "{% for a in range(10) %}{{ 'x' * 10000000 }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("64 MiB"), "{err}");
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_000), (2024, 10, 4));
        assert_eq!(strftime_now("%%").len(), 1);
    }
}
