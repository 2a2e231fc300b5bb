//! Chat templates as Hugging Face applies them: the Jinja template from the model's
//! `chat_template.jinja` or `tokenizer_config.json` (or `--chat-template`), rendered with
//! `messages`, `bos_token`, `eos_token` and `add_generation_prompt`, with HF's
//! `trim_blocks`/`lstrip_blocks` and Python string methods (`.strip()`, `.startswith()`).
//!
//! A template that fails on a request's messages is the request's fault, answered 400: with
//! the template's own `raise_exception` message, or naming the message it cannot render,
//! never with the template engine's error (which says nothing a client can act on).

use std::path::Path;

use minijinja::{Environment, ErrorKind};
use serde_json::Value;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat";
/// Marks errors the template raised itself: their message is meant for the user.
const RAISED: &str = "raise_exception: ";
/// Prefixes of the messages rendered to find the one a template fails on.
const MAX_MESSAGES_SEARCHED: usize = 64;

impl ChatTemplate {
    /// Reads the template beside the model: `override_` (a file or the template itself), else
    /// `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`. `Ok(None)` if the
    /// model has none (chat completions then answer 400).
    pub fn from_model_dir(dir: &Path, override_: Option<&str>) -> Result<Option<Self>, String> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| format!("{}: invalid JSON: {e}", config_path.display()))?,
            Err(_) => Value::Null,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = match override_ {
            Some(o) if Path::new(o).is_file() => {
                Some(std::fs::read_to_string(o).map_err(|e| format!("reading chat template {o}: {e}"))?)
            }
            Some(o) => Some(o.to_string()),
            None if jinja_path.is_file() => Some(
                std::fs::read_to_string(&jinja_path).map_err(|e| format!("{}: {e}", jinja_path.display()))?,
            ),
            None => template_from_config(&config["chat_template"]),
        };
        let Some(source) = source else {
            return Ok(None);
        };
        Self::new(
            source,
            special_token(&config["bos_token"]),
            special_token(&config["eos_token"]),
        )
        .map(Some)
    }

    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<(), minijinja::Error> {
            Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("{RAISED}{msg}"),
            ))
        });
        env.add_template_owned(NAME, source)
            .map_err(|e| format!("invalid chat template: {e:#}"))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders `messages` (OpenAI chat messages, content already flattened to text). An error
    /// here is the request's fault: the template's own message, or which message it could not
    /// render. `kwargs` are more variables (vLLM's `chat_template_kwargs`); they cannot replace
    /// `messages` and the others.
    pub fn render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, Value>,
    ) -> Result<String, String> {
        let err = match self.try_render(messages, add_generation_prompt, kwargs) {
            Ok(text) => return Ok(text),
            Err(e) => e,
        };
        if let Some(msg) = raised(&err) {
            return Err(format!("the chat template refused these messages: {msg}"));
        }
        tracing::debug!("chat template failed: {err:#}");
        let no_content = messages
            .iter()
            .position(|m| m.get("content").is_none_or(Value::is_null));
        if let Some(i) = no_content {
            return Err(format!(
                "messages[{i}] (role {}) has no text content (`content` null or missing, as in a tool call), which this model's chat template cannot render; tool calls are not supported by this server",
                messages[i]["role"]
            ));
        }
        // The first message whose prefix fails is the one the template cannot render.
        let culprit = (1..=messages.len().min(MAX_MESSAGES_SEARCHED)).find(|&k| {
            self.try_render(&messages[..k], false, kwargs)
                .is_err_and(|e| raised(&e).is_none())
        });
        Err(match culprit {
            Some(k) => format!(
                "messages[{}] (role {}) cannot be rendered by this model's chat template",
                k - 1,
                messages[k - 1]["role"]
            ),
            None => "this model's chat template cannot render these messages".to_string(),
        })
    }

    fn try_render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, Value>,
    ) -> Result<String, minijinja::Error> {
        self.env.get_template(NAME)?.render(minijinja::context! {
            messages => messages,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            add_generation_prompt => add_generation_prompt,
            ..minijinja::Value::from_serialize(kwargs)
        })
    }
}

/// The message of an error the template raised itself.
fn raised(err: &minijinja::Error) -> Option<&str> {
    err.detail().and_then(|d| d.strip_prefix(RAISED))
}

/// `chat_template` is a string, or a list of `{name, template}` (use `default`).
fn template_from_config(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .or_else(|| list.first())
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// `bos_token` is a string or an `AddedToken` object with `content`.
fn special_token(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_llama3_style_template() -> Result<(), String> {
        let src = "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";
        let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into())?;
        let none = serde_json::Map::new();
        let msgs = [json!({"role": "user", "content": " hi "})];
        assert_eq!(
            t.render(&msgs, true, &none)?,
            "<s><|user|>\nhi</s><|assistant|>\n"
        );
        assert_eq!(t.render(&msgs, false, &none)?, "<s><|user|>\nhi</s>");
        Ok(())
    }

    #[test]
    fn python_methods_and_raise_exception() -> Result<(), String> {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new())?;
        let none = serde_json::Map::new();
        assert_eq!(
            t.render(&[json!({"role": "user", "content": " a "})], true, &none)?,
            "A"
        );
        let err = t
            .render(&[json!({"role": "system", "content": "x"})], true, &none)
            .expect_err("template raises");
        assert!(err.contains("first must be user"), "{err}");
        Ok(())
    }

    #[test]
    fn chat_template_kwargs_are_variables_but_cannot_replace_messages() -> Result<(), String> {
        let src = "{% if enable_thinking %}T{% else %}F{% endif %}{{ messages | length }}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new())?;
        let msgs = [json!({"role": "user", "content": "a"})];
        assert_eq!(t.render(&msgs, true, &serde_json::Map::new())?, "F1");
        let kwargs = json!({"enable_thinking": true, "messages": []});
        let kwargs = kwargs.as_object().ok_or("object")?;
        assert_eq!(t.render(&msgs, true, kwargs)?, "T1");
        Ok(())
    }

    #[test]
    fn a_failing_message_is_named_never_the_template_error() -> Result<(), String> {
        // As many templates do: content concatenated as a string.
        let src = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}\n{% endfor %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new())?;
        let none = serde_json::Map::new();
        let tool_call = [
            json!({"role": "user", "content": "weather?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c"}]}),
        ];
        let err = t.render(&tool_call, true, &none).expect_err("null content");
        assert!(err.starts_with("messages[1] (role \"assistant\")"), "{err}");
        assert!(!err.contains("operator") && !err.contains("none"), "{err}");
        // Content of another type: found by rendering prefixes.
        let odd = [
            json!({"role": "user", "content": "a"}),
            json!({"role": "user", "content": "b"}),
            json!({"role": "user", "content": 7}),
        ];
        let err = t.render(&odd, true, &none).expect_err("number content");
        assert!(
            err.starts_with("messages[2] (role \"user\") cannot be rendered"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn template_list_and_added_token_objects() {
        let v = json!([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]);
        assert_eq!(template_from_config(&v).as_deref(), Some("D"));
        assert_eq!(special_token(&json!({"content": "<s>", "lstrip": false})), "<s>");
    }
}
