//! Structured outputs: a request's output held to a JSON schema, a regex, a list of choices or a
//! Lark or GBNF grammar, with `llguidance` (the engine vLLM and SGLang use). Each constrained sequence
//! has a [`Matcher`]; each step the engine asks it for the tokens allowed next (a mask over the
//! vocabulary, computed on rayon threads while the model runs), bans the others in the row's
//! logits before sampling, and feeds it the sampled token. A sequence whose grammar is complete
//! and admits nothing more finishes with "stop" (vLLM's behaviour); EOS is allowed only where
//! the grammar may end.
//!
//! The token trie is built from the model's own tokenizer (its `tokenizer.json` as
//! `tokenizers` serializes it, read by llguidance's reader of that format), sized to the
//! model's vocabulary: ids the tokenizer does not know are never allowed. Building it takes
//! about half a second for a 128k vocabulary (BENCHMARKS.md), so the engine builds it on a
//! thread of its own ([`Grammars::spawn`]): neither the engine's start nor unconstrained
//! requests wait for it, only the first constrained one.

use std::collections::VecDeque;
use std::sync::{Arc, Barrier, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

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
    /// A sentence of this grammar: Lark, in llguidance's dialect, or GBNF (llama.cpp's, which
    /// vLLM's xgrammar backend takes), translated into Lark ([`crate::gbnf`]).
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
            Constraint::Grammar(g) if crate::gbnf::is_gbnf(g) => {
                TopLevelGrammar::from_lark(crate::gbnf::to_lark(g)?)
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
    table: Arc<TokenTable>,
    /// The last constraints compiled, each with a matcher at its start (never advanced), oldest
    /// first: the server's check and the engine's queueing compile the same constraint, and
    /// clients tend to send one schema many times.
    cache: Arc<Mutex<VecDeque<(Constraint, Matcher)>>>,
}

/// The parser factory over the vocabulary's token trie, once built, or why there is none.
struct TokenTable {
    built: OnceLock<Result<ParserFactory, String>>,
    /// The thread building it, until someone needs it.
    building: Mutex<Option<JoinHandle<Result<ParserFactory, String>>>>,
}

impl Grammars {
    /// Builds the token table now. `eos_token_ids` end a constrained output where its grammar
    /// may end. Fails where the tokenizer's vocabulary cannot be read as bytes (neither
    /// byte-level BPE nor byte fallback) or the model has no EOS token.
    pub fn new(
        tokenizer: &tokenizers::Tokenizer,
        vocab_size: usize,
        eos_token_ids: &[u32],
    ) -> Result<Self, String> {
        let factory = token_table(tokenizer, vocab_size, eos_token_ids)?;
        Ok(Self::of(OnceLock::from(Ok(factory)), None))
    }

    /// Starts building the token table on a thread of its own and returns at once; the first
    /// [`Grammars::matcher`] (or [`Grammars::available`]) waits for it. `hold`: the thread
    /// waits at this barrier first (tests of what runs without the table).
    pub fn spawn(
        tokenizer: Arc<tokenizers::Tokenizer>,
        vocab_size: usize,
        eos_token_ids: Vec<u32>,
        hold: Option<Arc<Barrier>>,
    ) -> Self {
        let thread = std::thread::Builder::new()
            .name("token-table".into())
            .spawn(move || {
                if let Some(b) = hold {
                    b.wait();
                }
                let start = Instant::now();
                let table = token_table(&tokenizer, vocab_size, &eos_token_ids);
                match &table {
                    Ok(_) => tracing::debug!("token table built in {:?}", start.elapsed()),
                    Err(e) => tracing::debug!("no structured outputs for this model: {e}"),
                }
                table
            });
        match thread {
            Ok(t) => Self::of(OnceLock::new(), Some(t)),
            Err(e) => Self::unavailable(format!("starting the token table's thread: {e}")),
        }
    }

    /// No structured outputs, for this reason (the model has no tokenizer, ...).
    pub fn unavailable(why: String) -> Self {
        Self::of(OnceLock::from(Err(why)), None)
    }

    fn of(
        built: OnceLock<Result<ParserFactory, String>>,
        building: Option<JoinHandle<Result<ParserFactory, String>>>,
    ) -> Self {
        Grammars {
            table: Arc::new(TokenTable {
                built,
                building: Mutex::new(building),
            }),
            cache: Arc::default(),
        }
    }

    /// The factory, waiting for its thread if it is still building.
    fn factory(&self) -> Result<&ParserFactory, &str> {
        let built = self.table.built.get_or_init(|| {
            let thread = (self.table.building.lock().unwrap_or_else(PoisonError::into_inner)).take();
            match thread.map(JoinHandle::join) {
                Some(Ok(table)) => table,
                Some(Err(_)) => Err("building the token table failed".into()),
                None => Err("the token table was never built".into()),
            }
        });
        built.as_ref().map_err(String::as_str)
    }

    /// Whether constraints can be compiled for this model (waiting for the token table if it
    /// is still building); the error says why not.
    pub fn available(&self) -> Result<(), &str> {
        self.factory().map(drop)
    }

    /// Whether the token table is built (or known to be impossible), without waiting.
    pub fn is_ready(&self) -> bool {
        self.table.built.get().is_some()
            || (self.table.building.lock().unwrap_or_else(PoisonError::into_inner))
                .as_ref()
                .is_some_and(JoinHandle::is_finished)
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
        let factory = self.factory()?;
        // Compiled outside the lock: a large schema must not hold up other requests' copies.
        let grammar = constraint.grammar()?;
        let parser = (factory.create_parser(grammar)).map_err(|e| e.to_string())?;
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

/// llguidance's parser factory over the token trie of `tokenizer`'s vocabulary, `vocab_size`
/// ids long.
fn token_table(
    tokenizer: &tokenizers::Tokenizer,
    vocab_size: usize,
    eos_token_ids: &[u32],
) -> Result<ParserFactory, String> {
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
    Ok(factory)
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
    fn a_table_built_on_its_thread_is_waited_for_only_by_those_who_need_it() {
        let tok = Arc::new(crate::demo::demo_tokenizer().expect("demo tokenizer"));
        let hold = Arc::new(Barrier::new(2));
        let g = Grammars::spawn(tok.clone(), 2048, vec![0], Some(hold.clone()));
        let copy = g.clone();
        assert!(!g.is_ready() && !copy.is_ready(), "held at the barrier");
        hold.wait();
        let m = copy.matcher(&Constraint::Regex("[a-z]{3}".into()));
        assert!(m.is_ok(), "the clone waits for the shared table");
        assert!(g.is_ready() && g.available().is_ok());
        // A vocabulary without EOS: no table, and every caller hears why.
        let none = Grammars::spawn(tok, 2048, vec![], None);
        assert_eq!(none.available(), Err("the model has no EOS token"));
        let e = none.matcher(&Constraint::JsonObject).err();
        assert_eq!(e.as_deref(), Some("the model has no EOS token"));
        let unavailable = Grammars::unavailable("no tokenizer".into());
        assert_eq!(unavailable.available(), Err("no tokenizer"));
    }

    /// Whether the grammar accepts `text` whole (fed as the demo tokenizer's tokens).
    fn accepts(g: &Grammars, grammar: &str, text: &str) -> bool {
        let tok = crate::demo::demo_tokenizer().expect("demo tokenizer");
        let ids = tok.encode(text, false).expect("encodes").get_ids().to_vec();
        let mut m = g.matcher(&Constraint::Grammar(grammar.into())).expect("compiles");
        m.try_consume_tokens(&ids).ok() == Some(ids.len()) && m.is_accepting().unwrap_or(false)
    }

    /// llama.cpp's `grammars/json.gbnf`.
    const JSON_GBNF: &str = r#"root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"#;

    /// llama.cpp's `grammars/arithmetic.gbnf`.
    const ARITHMETIC_GBNF: &str = r#"root  ::= (expr "=" ws term "\n")+
expr  ::= term ([-+*/] term)*
term  ::= ident | num | "(" ws expr ")" ws
ident ::= [a-z] [a-z0-9_]* ws
num   ::= [0-9]+ ws
ws    ::= [ \t\n]*
"#;

    /// llama.cpp's `grammars/list.gbnf`.
    const LIST_GBNF: &str = r#"root ::= item+

# Excludes various line break characters
item ::= "- " [^\r\n\x0b\x0c\x85\u2028\u2029]+ "\n"
"#;

    #[test]
    fn real_gbnf_grammars_accept_and_refuse_as_written() {
        let g = grammars();
        for (grammar, good, bad) in [
            (
                JSON_GBNF,
                &[
                    r#"{"a": [1, -2.5e3, true, null], "b": {"c": "x\"y\u00e9"}}"#,
                    "{}",
                    "{ \"k\" : \"v\" }",
                ][..],
                &[r#"{"a": 01}"#, "[1]", r#"{"a" 1}"#, "{\"a\": tru}"][..],
            ),
            (
                ARITHMETIC_GBNF,
                &["a+b=c\n", "(x1 *22)-y = z\n1=2\n"][..],
                &["a+b\n", "A=b\n", "a+=b\n", "a+ b=c\n"][..],
            ),
            (
                LIST_GBNF,
                &["- one\n", "- one\n- two words\n"][..],
                &["- \n", "one\n", "- one"][..],
            ),
        ] {
            for text in good {
                assert!(accepts(&g, grammar, text), "{text:?} refused");
            }
            for text in bad {
                assert!(!accepts(&g, grammar, text), "{text:?} accepted");
            }
        }
        // Characters a class and a literal both match: a character-level grammar's reading.
        assert!(accepts(&g, "root ::= [a-z]* \"x\"", "abx"));
        assert!(accepts(&g, "root ::= [a-z]+ \"bc\"", "abc"));
        // Lark still reads as Lark.
        assert!(accepts(&g, "start: \"ab\" | \"cd\"", "cd"));
        let e = g
            .matcher(&Constraint::Grammar("root ::= \"a\" | undefined".into()))
            .err();
        assert!(e.is_some_and(|e| e.contains("GBNF") && e.contains("undefined")));
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
