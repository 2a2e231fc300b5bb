//! Structured outputs as clients ask for them: OpenAI's `response_format` (`json_object`,
//! `json_schema`), vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`
//! and its newer `structured_outputs` object, read into the engine's one [`Constraint`] per
//! request. Two constraints in one request are refused, naming both; so is a malformed one,
//! naming its field. Whether a schema, regex or grammar compiles is checked by the handler
//! with the engine's [`multilora_engine::Grammars`], so the 400 names the field too.

use multilora_engine::Constraint;
use serde_json::Value;

use crate::error::{ApiError, ApiResult};

/// The request fields that may carry a constraint.
#[derive(Default)]
pub struct StructuredFields<'a> {
    pub response_format: Option<&'a Value>,
    pub guided_json: Option<&'a Value>,
    pub guided_regex: Option<&'a Value>,
    pub guided_choice: Option<&'a Value>,
    pub guided_grammar: Option<&'a Value>,
    pub structured_outputs: Option<&'a Value>,
}

/// The request's constraint and the field it came from; `None` for free output.
pub fn constraint(f: StructuredFields<'_>) -> ApiResult<Option<(&'static str, Constraint)>> {
    let set = |v: Option<&Value>| v.filter(|v| !v.is_null()).cloned();
    let mut found: Vec<(&'static str, Constraint)> = Vec::new();
    if let Some(rf) = set(f.response_format) {
        if let Some(c) = response_format(&rf)? {
            found.push(("response_format", c));
        }
    }
    if let Some(v) = set(f.guided_json) {
        found.push((
            "guided_json",
            Constraint::JsonSchema(json_schema("guided_json", v)?),
        ));
    }
    if let Some(v) = set(f.guided_regex) {
        found.push(("guided_regex", Constraint::Regex(string("guided_regex", v)?)));
    }
    if let Some(v) = set(f.guided_choice) {
        found.push(("guided_choice", Constraint::Choice(choices("guided_choice", v)?)));
    }
    if let Some(v) = set(f.guided_grammar) {
        found.push((
            "guided_grammar",
            Constraint::Grammar(string("guided_grammar", v)?),
        ));
    }
    if let Some(v) = set(f.structured_outputs) {
        if let Some(c) = structured_outputs(&v)? {
            found.push(("structured_outputs", c));
        }
    }
    one_of(found)
}

/// At most one constraint; a second is refused by name.
fn one_of(mut found: Vec<(&'static str, Constraint)>) -> ApiResult<Option<(&'static str, Constraint)>> {
    if found.len() > 1 {
        let (first, second) = (found[0].0, found[1].0);
        return Err(ApiError::bad_param(
            second,
            format!("{second}: a request takes one structured-output constraint, and {first} is one already"),
        ));
    }
    Ok(found.pop())
}

/// OpenAI's `response_format`: `text` (free), `json_object`, or `json_schema` with its schema
/// under `json_schema.schema`.
fn response_format(v: &Value) -> ApiResult<Option<Constraint>> {
    const FIELD: &str = "response_format";
    let bad = |msg: &str| ApiError::bad_param(FIELD, format!("{FIELD}: {msg}"));
    match v["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => match v["json_schema"].get("schema") {
            Some(schema) if !schema.is_null() => {
                Ok(Some(Constraint::JsonSchema(json_schema(FIELD, schema.clone())?)))
            }
            _ => Err(bad("type json_schema needs json_schema.schema")),
        },
        Some(other) => Err(bad(&format!(
            "type {other:?} is not supported; expected text, json_object or json_schema"
        ))),
        None => Err(bad("expected an object with a type")),
    }
}

/// vLLM's `structured_outputs`: one of `json`, `regex`, `choice`, `grammar`, `json_object`.
/// Options this server does not implement are refused by name.
fn structured_outputs(v: &Value) -> ApiResult<Option<Constraint>> {
    const FIELD: &str = "structured_outputs";
    let Value::Object(o) = v else {
        return Err(ApiError::bad_param(
            FIELD,
            format!("{FIELD}: expected an object, got {v}"),
        ));
    };
    let mut found = Vec::new();
    for (key, v) in o.iter().filter(|(_, v)| !v.is_null()) {
        let c = match key.as_str() {
            "json" => Constraint::JsonSchema(json_schema(FIELD, v.clone())?),
            "regex" => Constraint::Regex(string(FIELD, v.clone())?),
            "choice" => Constraint::Choice(choices(FIELD, v.clone())?),
            "grammar" => Constraint::Grammar(string(FIELD, v.clone())?),
            "json_object" if v == &Value::Bool(true) => Constraint::JsonObject,
            // Asking for the default, or for a choice of backend (there is one).
            "json_object" | "disable_any_whitespace" | "disable_additional_properties"
                if v == &Value::Bool(false) =>
            {
                continue
            }
            "backend" | "disable_fallback" => continue,
            other => {
                return Err(ApiError::bad_param(
                    FIELD,
                    format!(
                        "{FIELD}.{other} is not supported; use json, regex, choice, grammar or json_object"
                    ),
                ))
            }
        };
        found.push((FIELD, c));
    }
    if found.len() > 1 {
        return Err(ApiError::bad_param(
            FIELD,
            format!("{FIELD}: give one of json, regex, choice, grammar, json_object"),
        ));
    }
    Ok(found.pop().map(|(_, c)| c))
}

/// A JSON schema as an object, or as a string holding one (vLLM takes both).
fn json_schema(field: &str, v: Value) -> ApiResult<Value> {
    match v {
        Value::String(s) => serde_json::from_str(&s)
            .map_err(|e| ApiError::bad_param(field, format!("{field}: the schema is not valid JSON: {e}"))),
        v @ (Value::Object(_) | Value::Bool(_)) => Ok(v),
        v => Err(ApiError::bad_param(
            field,
            format!("{field}: expected a JSON schema, got {v}"),
        )),
    }
}

fn string(field: &str, v: Value) -> ApiResult<String> {
    match v {
        Value::String(s) => Ok(s),
        v => Err(ApiError::bad_param(
            field,
            format!("{field}: expected a string, got {v}"),
        )),
    }
}

fn choices(field: &str, v: Value) -> ApiResult<Vec<String>> {
    let bad = || ApiError::bad_param(field, format!("{field}: expected a non-empty list of strings"));
    let Value::Array(items) = v else {
        return Err(bad());
    };
    let list: Option<Vec<String>> = items.into_iter().map(|i| i.as_str().map(String::from)).collect();
    list.filter(|l| !l.is_empty()).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(field: &str, v: Value) -> ApiResult<Option<(&'static str, Constraint)>> {
        let mut f = StructuredFields::default();
        match field {
            "response_format" => f.response_format = Some(&v),
            "guided_json" => f.guided_json = Some(&v),
            "guided_regex" => f.guided_regex = Some(&v),
            "guided_choice" => f.guided_choice = Some(&v),
            "guided_grammar" => f.guided_grammar = Some(&v),
            _ => f.structured_outputs = Some(&v),
        }
        constraint(f)
    }

    #[test]
    fn each_field_reads_into_its_constraint() -> Result<(), Box<dyn std::error::Error>> {
        let schema = json!({"type": "object"});
        for (field, v, want) in [
            ("response_format", json!({"type": "text"}), None),
            (
                "response_format",
                json!({"type": "json_object"}),
                Some(Constraint::JsonObject),
            ),
            (
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}),
                Some(Constraint::JsonSchema(schema.clone())),
            ),
            (
                "guided_json",
                json!("{\"type\": \"object\"}"),
                Some(Constraint::JsonSchema(schema.clone())),
            ),
            (
                "guided_regex",
                json!("[a-z]+"),
                Some(Constraint::Regex("[a-z]+".into())),
            ),
            (
                "guided_choice",
                json!(["yes", "no"]),
                Some(Constraint::Choice(vec!["yes".into(), "no".into()])),
            ),
            (
                "guided_grammar",
                json!("start: \"a\""),
                Some(Constraint::Grammar("start: \"a\"".into())),
            ),
            (
                "structured_outputs",
                json!({"choice": ["a"], "regex": null, "disable_any_whitespace": false}),
                Some(Constraint::Choice(vec!["a".into()])),
            ),
        ] {
            let got = read(field, v).map_err(|e| e.message)?;
            assert_eq!(got.as_ref().map(|g| &g.1), want.as_ref(), "{field}");
            if want.is_some() {
                assert_eq!(got.map(|g| g.0), Some(field));
            }
        }
        Ok(())
    }

    #[test]
    fn malformed_or_doubled_constraints_are_refused_by_name() {
        for (field, v) in [
            ("response_format", json!({"type": "json_schema"})),
            ("response_format", json!({"type": "yaml"})),
            ("guided_json", json!("{not json")),
            ("guided_regex", json!(5)),
            ("guided_choice", json!([])),
            ("guided_choice", json!(["a", 1])),
            ("structured_outputs", json!({"choice": ["a"], "regex": "b"})),
            ("structured_outputs", json!({"structural_tag": "x"})),
        ] {
            let err = read(field, v.clone()).err();
            let err = err.unwrap_or_else(|| panic!("{field}: {v} accepted"));
            assert_eq!(err.param.as_deref(), Some(field), "{}", err.message);
            assert!(err.message.contains(field), "{}", err.message);
        }
        let (regex, choice) = (json!("a"), json!(["a"]));
        let err = constraint(StructuredFields {
            guided_regex: Some(&regex),
            guided_choice: Some(&choice),
            ..Default::default()
        })
        .err()
        .map(|e| (e.param, e.message));
        let (param, message) = err.unwrap_or_default();
        assert_eq!(param.as_deref(), Some("guided_choice"));
        assert!(message.contains("guided_regex"), "{message}");
    }
}
