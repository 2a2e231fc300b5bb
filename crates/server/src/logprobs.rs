//! The engine's token log-probabilities in the response shapes vLLM gives them:
//!
//! - completions' `logprobs` (the legacy OpenAI object lm-evaluation-harness reads):
//!   `tokens`, `token_logprobs` (`null` for the first prompt token under `echo`),
//!   `top_logprobs` (a `{token: logprob}` map of the token itself and the `logprobs` most
//!   likely, `null` where `token_logprobs` is) and `text_offset` (characters before each token,
//!   counted over the tokens' strings);
//! - chat's `logprobs.content`: `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`
//!   with `top_logprobs` entries;
//! - vLLM's `prompt_logprobs`: `[null, {"<id>": {logprob, rank, decoded_token}}, ...]`, the
//!   prompt token itself and the `prompt_logprobs` most likely at each position.
//!
//! A log-probability of -inf (a token the model cannot produce) is written as -9999.0, as vLLM
//! does, since JSON has no infinity.

use std::sync::Arc;

use multilora_engine::TokenLogprob;
use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

/// The floor vLLM writes for -inf.
const MIN_LOGPROB: f32 = -9999.0;

fn finite(logprob: f32) -> f32 {
    if logprob.is_nan() {
        MIN_LOGPROB
    } else {
        logprob.max(MIN_LOGPROB)
    }
}

/// One token's text, special tokens included.
pub fn token_text(tokenizer: &Tokenizer, token_id: u32) -> String {
    tokenizer.decode(&[token_id], false).unwrap_or_default()
}

/// How logprob entries name a token: its text, or with vLLM's `return_tokens_as_token_ids`
/// `"token_id:{id}"` (unambiguous where texts are not, e.g. bytes of a multi-byte character).
#[derive(Clone)]
pub struct TokenNames {
    pub tokenizer: Arc<Tokenizer>,
    pub as_ids: bool,
}

impl TokenNames {
    pub fn name(&self, token_id: u32) -> String {
        match self.as_ids {
            true => format!("token_id:{token_id}"),
            false => token_text(&self.tokenizer, token_id),
        }
    }
}

/// The token itself, then the `k` most likely, each once, as `(id, logprob)`.
fn with_top(lp: &TokenLogprob, k: usize) -> impl Iterator<Item = (u32, f32)> + '_ {
    let top = lp.top.iter().take(k).filter(move |t| t.0 != lp.token_id).copied();
    std::iter::once((lp.token_id, lp.logprob)).chain(top)
}

/// Completions' `logprobs` object, filled token by token. Streaming takes what was added since
/// the last chunk; offsets carry on across chunks.
pub struct CompletionLogprobs {
    names: TokenNames,
    num_top: usize,
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
    next_offset: usize,
}

impl CompletionLogprobs {
    pub fn new(names: TokenNames, num_top: usize) -> Self {
        CompletionLogprobs {
            names,
            num_top,
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text_offset: Vec::new(),
            next_offset: 0,
        }
    }

    /// Adds a token; `lp` is `None` for the first prompt token (nothing before it to score it).
    pub fn push(&mut self, token_id: u32, lp: Option<&TokenLogprob>) {
        // Offsets count the text's characters, whatever names the tokens.
        let text = token_text(&self.names.tokenizer, token_id);
        self.text_offset.push(self.next_offset.into());
        self.next_offset += text.chars().count();
        self.tokens.push(self.names.name(token_id).into());
        match lp {
            None => {
                self.token_logprobs.push(Value::Null);
                self.top_logprobs.push(Value::Null);
            }
            Some(lp) => {
                self.token_logprobs.push(finite(lp.logprob).into());
                let mut top = Map::new();
                for (id, l) in with_top(lp, self.num_top) {
                    top.insert(self.names.name(id), finite(l).into());
                }
                self.top_logprobs.push(Value::Object(top));
            }
        }
    }

    /// The tokens added since the last call, as the response's `logprobs` object.
    pub fn take(&mut self) -> Value {
        json!({
            "tokens": std::mem::take(&mut self.tokens),
            "token_logprobs": std::mem::take(&mut self.token_logprobs),
            "top_logprobs": std::mem::take(&mut self.top_logprobs),
            "text_offset": std::mem::take(&mut self.text_offset),
        })
    }
}

/// Chat's `logprobs.content` entry of one output token, with `k` alternatives.
pub fn chat_entry(names: &TokenNames, lp: &TokenLogprob, k: usize) -> Value {
    let entry = |id: u32, logprob: f32| {
        let token = names.name(id);
        let bytes: Vec<u8> = token.as_bytes().to_vec();
        json!({"token": token, "logprob": finite(logprob), "bytes": bytes})
    };
    let mut e = entry(lp.token_id, lp.logprob);
    let top: Vec<Value> = lp.top.iter().take(k).map(|&(id, l)| entry(id, l)).collect();
    e["top_logprobs"] = top.into();
    e
}

/// vLLM's `prompt_logprobs` list, `k` alternatives a position.
pub fn prompt_logprobs(names: &TokenNames, lps: &[Option<TokenLogprob>], k: usize) -> Value {
    let position = |lp: &TokenLogprob| {
        let mut m = Map::new();
        for (id, l) in with_top(lp, k) {
            let rank = match id == lp.token_id {
                true => lp.rank as usize,
                false => 1 + lp.top.iter().position(|t| t.0 == id).unwrap_or(0),
            };
            let decoded = names.name(id);
            m.insert(
                id.to_string(),
                json!({"logprob": finite(l), "rank": rank, "decoded_token": decoded}),
            );
        }
        Value::Object(m)
    };
    lps.iter()
        .map(|lp| lp.as_ref().map_or(Value::Null, position))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(token_id: u32, logprob: f32, top: &[(u32, f32)]) -> TokenLogprob {
        TokenLogprob {
            token_id,
            logprob,
            rank: 1 + top.iter().filter(|t| t.1 > logprob).count() as u32,
            top: top.to_vec(),
        }
    }

    fn tokenizer() -> Result<Arc<Tokenizer>, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let model = dir.path().join("model");
        multilora_engine::demo::write_demo_model(&model, 1)?;
        let t = Tokenizer::from_file(model.join("tokenizer.json")).map_err(|e| e.to_string())?;
        Ok(Arc::new(t))
    }

    fn names(tokenizer: &Arc<Tokenizer>, as_ids: bool) -> TokenNames {
        TokenNames {
            tokenizer: tokenizer.clone(),
            as_ids,
        }
    }

    #[test]
    fn completion_logprobs_have_offsets_nulls_and_the_token_in_its_top(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let tok = tokenizer()?;
        let mut c = CompletionLogprobs::new(names(&tok, false), 1);
        let (a, b) = (10, 11);
        c.push(a, None);
        c.push(b, Some(&lp(b, -2.0, &[(a, -0.5)])));
        c.push(a, Some(&lp(a, f32::NEG_INFINITY, &[(a, -0.1)])));
        let v = c.take();
        assert_eq!(v["token_logprobs"], json!([null, -2.0, -9999.0]));
        assert!(v["top_logprobs"][0].is_null());
        let (ta, tb) = (token_text(&tok, a), token_text(&tok, b));
        assert_eq!(v["top_logprobs"][1], json!({tb.clone(): -2.0, ta.clone(): -0.5}));
        assert_eq!(
            v["top_logprobs"][2].as_object().map(Map::len),
            Some(1),
            "the token is its own top"
        );
        let (la, lb) = (ta.chars().count(), tb.chars().count());
        assert_eq!(v["text_offset"], json!([0, la, la + lb]));
        // A stream's next chunk continues the offsets.
        c.push(b, Some(&lp(b, -1.0, &[])));
        assert_eq!(c.take()["text_offset"], json!([2 * la + lb]));
        Ok(())
    }

    #[test]
    fn chat_and_prompt_logprobs_shapes() -> Result<(), Box<dyn std::error::Error>> {
        let tok = tokenizer()?;
        let l = lp(7, -1.5, &[(3, -0.2), (7, -1.5), (9, -3.0)]);
        let e = chat_entry(&names(&tok, false), &l, 2);
        assert_eq!(e["logprob"], json!(-1.5));
        assert_eq!(e["top_logprobs"].as_array().map(Vec::len), Some(2));
        assert_eq!(e["top_logprobs"][0]["token"], json!(token_text(&tok, 3)));
        assert_eq!(e["bytes"], json!(token_text(&tok, 7).into_bytes()));
        assert_eq!(chat_entry(&names(&tok, false), &l, 0)["top_logprobs"], json!([]));
        let p = prompt_logprobs(&names(&tok, false), &[None, Some(l.clone())], 1);
        assert!(p[0].is_null());
        assert_eq!(p[1]["7"]["rank"], json!(2));
        assert_eq!(p[1]["3"]["rank"], json!(1));
        assert_eq!(p[1].as_object().map(Map::len), Some(2));
        Ok(())
    }

    #[test]
    fn tokens_as_ids_name_every_entry_and_keep_text_offsets() -> Result<(), Box<dyn std::error::Error>> {
        let tok = tokenizer()?;
        let ids = names(&tok, true);
        let mut c = CompletionLogprobs::new(ids.clone(), 1);
        c.push(10, None);
        c.push(11, Some(&lp(11, -2.0, &[(10, -0.5)])));
        let v = c.take();
        assert_eq!(v["tokens"], json!(["token_id:10", "token_id:11"]));
        assert_eq!(
            v["top_logprobs"][1],
            json!({"token_id:11": -2.0, "token_id:10": -0.5})
        );
        let la = token_text(&tok, 10).chars().count();
        assert_eq!(v["text_offset"], json!([0, la]), "offsets follow the text");
        let l = lp(7, -1.5, &[(3, -0.2)]);
        let e = chat_entry(&ids, &l, 1);
        assert_eq!(e["token"], json!("token_id:7"));
        assert_eq!(e["top_logprobs"][0]["token"], json!("token_id:3"));
        let p = prompt_logprobs(&ids, &[None, Some(l)], 1);
        assert_eq!(p[1]["7"]["decoded_token"], json!("token_id:7"));
        Ok(())
    }
}
