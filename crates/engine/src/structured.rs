//! Structured outputs: a request's output held to a JSON schema, a regex, a list of choices or a
//! Lark grammar, with `llguidance` (the engine vLLM and SGLang use). Each constrained sequence
//! has a [`Matcher`]; each step the engine asks it for the tokens allowed next (a mask over the
//! vocabulary, computed on rayon threads while the model runs), bans the others in the row's
//! logits before sampling, and feeds it the sampled token. A sequence whose grammar is complete
//! and admits nothing more finishes with "stop" (vLLM's behaviour); EOS is allowed only where
//! the grammar may end.
//!
//! The token trie is built from the model's own tokenizer (its `tokenizer.json` as
//! `tokenizers` serializes it, read by llguidance's reader of that format), sized to the
//! model's vocabulary: ids the tokenizer does not know are never allowed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON value valid against this JSON schema.
    JsonSchema(serde_json::Value),
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A match of this regex, whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A sentence of this Lark grammar, in llguidance's dialect.
    Grammar(String),
}

impl Constraint {
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Constraint::JsonSchema(schema) => TopLevelGrammar::from_json_schema(schema.clone()),
            Constraint::JsonObject => {
                TopLevelGrammar::from_json_schema(serde_json::json!({"type": "object"}))
            }
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Choice(choices) => {
                if choices.is_empty() {
                    return Err("needs at least one choice".into());
                }
                let alternatives: Vec<String> = choices.iter().map(|c| regex::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
            }
            Constraint::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
        })
    }
}

/// Compiled constraints kept for reuse; see [`Grammars::matcher`].
const MAX_CACHED_GRAMMARS: usize = 32;

/// Compiles constraints into matchers for one model's vocabulary. Cheap to clone (shared), so
/// the server can check a request's constraint before queueing it.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
    /// The last constraints compiled, each with a matcher at its start (never advanced), oldest
    /// first: the server's check and the engine's queueing compile the same constraint, and
    /// clients tend to send one schema many times.
    cache: Arc<Mutex<VecDeque<(Constraint, Matcher)>>>,
}

impl Grammars {
    /// `eos_token_ids` end a constrained output where its grammar may end. Fails where the
    /// tokenizer's vocabulary cannot be read as bytes (neither byte-level BPE nor byte
    /// fallback) or the model has no EOS token.
    pub fn new(
        tokenizer: &tokenizers::Tokenizer,
        vocab_size: usize,
        eos_token_ids: &[u32],
    ) -> Result<Self, String> {
        let json = serde_json::to_value(tokenizer).map_err(|e| e.to_string())?;
        // The reader asserts on malformed byte-fallback names; a tokenizer that trips it gets
        // no structured outputs, not a crashed engine.
        let read = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json));
        let mut words = match read {
            Ok(Ok(words)) => words,
            Ok(Err(e)) => return Err(format!("reading the tokenizer's vocabulary: {e}")),
            Err(_) => return Err("reading the tokenizer's vocabulary failed".into()),
        };
        words.resize(vocab_size, Vec::new());
        let eos: Vec<u32> = (eos_token_ids.iter())
            .copied()
            .filter(|&t| (t as usize) < vocab_size)
            .collect();
        let Some(&first_eos) = eos.first() else {
            return Err("the model has no EOS token".into());
        };
        let info = TokRxInfo::new(vocab_size as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        // Errors reach the caller as values; nothing on stderr.
        factory.quiet();
        Ok(Grammars {
            factory: Arc::new(factory),
            cache: Arc::default(),
        })
    }

    /// A matcher at the start of `constraint`'s grammar, compiled or copied from a recent
    /// compile; the error says what is wrong with the schema, regex or grammar.
    pub fn matcher(&self, constraint: &Constraint) -> Result<Matcher, String> {
        let cached = |cache: &VecDeque<(Constraint, Matcher)>| {
            (cache.iter().rev())
                .find(|(c, _)| c == constraint)
                .map(|(_, m)| m.deep_clone())
        };
        if let Some(m) = cached(&self.cache.lock().unwrap_or_else(PoisonError::into_inner)) {
            return Ok(m);
        }
        // Compiled outside the lock: a large schema must not hold up other requests' copies.
        let grammar = constraint.grammar()?;
        let parser = (self.factory.create_parser(grammar)).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if !cache.iter().any(|(c, _)| c == constraint) {
            if cache.len() == MAX_CACHED_GRAMMARS {
                cache.pop_front();
            }
            cache.push_back((constraint.clone(), matcher.deep_clone()));
        }
        Ok(matcher)
    }
}

/// Bans in `logits` (`[vocab]`) every token `mask` does not allow.
pub fn apply_mask(mask: &SimpleVob, logits: &mut [f32]) {
    for (t, l) in logits.iter_mut().enumerate() {
        if !mask.is_allowed(t as u32) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Whether `banned` holds every token `mask` allows (banning them would leave nothing). Ids
/// outside the vocabulary are ignored.
pub fn allows_only(mask: &SimpleVob, banned: &[u32]) -> bool {
    let mut hit: Vec<u32> = (banned.iter().copied())
        .filter(|&t| (t as usize) < mask.len() && mask.is_allowed(t))
        .collect();
    hit.sort_unstable();
    hit.dedup();
    hit.len() == mask.num_set()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammars() -> Grammars {
        let tok = crate::demo::demo_tokenizer().expect("demo tokenizer");
        Grammars::new(&tok, 2048, &[0]).expect("demo vocabulary reads")
    }

    #[test]
    fn allows_only_counts_distinct_allowed_bans() {
        let mut mask = SimpleVob::alloc(64);
        mask.allow_token(3);
        mask.allow_token(7);
        assert!(!allows_only(&mask, &[3, 3, 9]));
        assert!(allows_only(&mask, &[7, 3, 3, 1000]));
        assert!(allows_only(&SimpleVob::alloc(64), &[]));
    }

    #[test]
    fn bad_constraints_are_errors_not_panics() {
        let g = grammars();
        assert!(g.matcher(&Constraint::Regex("[a-z".into())).is_err());
        assert!(g.matcher(&Constraint::Choice(vec![])).is_err());
        assert!(g
            .matcher(&Constraint::Grammar("start: undefined_rule".into()))
            .is_err());
        assert!(g
            .matcher(&Constraint::JsonSchema(serde_json::json!({"type": 7})))
            .is_err());
        assert!(g.matcher(&Constraint::Regex("[a-z]{3}".into())).is_ok());
        assert!(g
            .matcher(&Constraint::Grammar("start: \"ab\" | \"cd\"".into()))
            .is_ok());
        assert!(g.matcher(&Constraint::JsonObject).is_ok());
    }

    #[test]
    fn a_choice_allows_only_its_prefixes_and_stops_when_complete() {
        let g = grammars();
        let tok = crate::demo::demo_tokenizer().expect("demo tokenizer");
        let mut m = g
            .matcher(&Constraint::Choice(vec!["yes".into(), "no".into()]))
            .expect("compiles");
        let mask = m.compute_mask().expect("mask");
        let allowed: Vec<String> = (0..2048u32)
            .filter(|&t| mask.is_allowed(t))
            .map(|t| tok.decode(&[t], false).unwrap_or_default())
            .collect();
        assert!(!allowed.is_empty());
        for s in &allowed {
            assert!(
                "yes".starts_with(s.as_str()) || "no".starts_with(s.as_str()),
                "{s:?}"
            );
        }
        let ids = tok.encode("no", false).expect("encodes").get_ids().to_vec();
        for &t in &ids {
            m.consume_token(t).expect("consumes");
        }
        assert!(m.is_stopped(), "nothing may follow a complete choice");

        // A second matcher for the same constraint (a copy of the cached compile) starts over.
        let mut again = g
            .matcher(&Constraint::Choice(vec!["yes".into(), "no".into()]))
            .expect("compiles");
        assert!(!again.is_stopped());
        assert_eq!(again.compute_mask().expect("mask").num_set(), mask.num_set());
    }
}
