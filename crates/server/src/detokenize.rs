//! Incremental detokenization with stop strings, for streaming. Tokens are decoded in a small
//! window (Hugging Face TGI's prefix/read offsets) so that each step costs O(window), multi-byte
//! characters split across tokens are held back until complete, and decoders that drop a
//! leading space on the first token (SentencePiece) still get spacing right.
//!
//! Stop strings end the text before the match (vLLM's default), or after it with
//! `include_stop_str_in_output`; while streaming, the last `longest stop - 1` bytes are held
//! back so that a stop string is never half-sent.

use std::sync::Arc;

use tokenizers::Tokenizer;

pub struct Detokenizer {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    text: String,
    /// Bytes of `text` already handed out.
    num_emitted: usize,
    stop: Vec<String>,
    max_stop_len: usize,
    include_stop_str: bool,
    skip_special_tokens: bool,
    /// The stop string that ended the text (vLLM's `stop_reason`).
    matched_stop: Option<usize>,
}

impl Detokenizer {
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn new(
        tokenizer: Arc<Tokenizer>,
        stop: Vec<String>,
        include_stop_str: bool,
        skip_special_tokens: bool,
    ) -> Self {
        let max_stop_len = stop.iter().map(String::len).max().unwrap_or(0);
        Detokenizer {
            include_stop_str,
            skip_special_tokens,
            matched_stop: None,
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            num_emitted: 0,
            stop,
            max_stop_len,
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer
            .decode(ids, self.skip_special_tokens)
            .unwrap_or_default()
    }

    /// Adds a token; returns true if the text now contains a stop string (the text is cut
    /// before it and the request should end).
    pub fn push(&mut self, token_id: u32) -> bool {
        self.ids.push(token_id);
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let new = self.decode(&self.ids[self.prefix_offset..]);
        if new.len() > prefix.len() && !new.ends_with('\u{FFFD}') && new.is_char_boundary(prefix.len()) {
            let old_len = self.text.len();
            self.text.push_str(&new[prefix.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return self.cut_at_stop(old_len);
        }
        false
    }

    /// Decodes what is still held back (an incomplete character at the very end).
    pub fn flush(&mut self) -> bool {
        if self.read_offset == self.ids.len() {
            return false;
        }
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let new = self.decode(&self.ids[self.prefix_offset..]);
        let old_len = self.text.len();
        if new.len() > prefix.len() && new.is_char_boundary(prefix.len()) {
            self.text.push_str(&new[prefix.len()..]);
        }
        self.read_offset = self.ids.len();
        self.cut_at_stop(old_len)
    }

    fn cut_at_stop(&mut self, old_len: usize) -> bool {
        if self.stop.is_empty() {
            return false;
        }
        // A match may start up to max_stop_len - 1 bytes before the new text.
        let mut from = old_len.saturating_sub(self.max_stop_len.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stop
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .filter_map(|(i, s)| self.text[from..].find(s.as_str()).map(|pos| (pos, i)))
            .min();
        match hit {
            Some((pos, i)) => {
                let end = match self.include_stop_str {
                    true => from + pos + self.stop[i].len(),
                    false => from + pos,
                };
                self.text.truncate(end);
                self.matched_stop = Some(i);
                self.num_emitted = self.num_emitted.min(self.text.len());
                true
            }
            None => false,
        }
    }

    /// The text not yet handed out; unless `is_final`, the tail that could start a stop string
    /// stays back.
    pub fn take_delta(&mut self, is_final: bool) -> &str {
        let mut end = if is_final {
            self.text.len()
        } else {
            self.text
                .len()
                .saturating_sub(self.max_stop_len.saturating_sub(1))
        };
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let start = self.num_emitted;
        if end <= start {
            return "";
        }
        self.num_emitted = end;
        &self.text[start..end]
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The stop string that ended the text, if one did.
    pub fn matched_stop(&self) -> Option<&str> {
        self.matched_stop.map(|i| self.stop[i].as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_tokenizer() -> Result<Arc<Tokenizer>, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        multilora_engine::demo::ensure_demo(dir.path(), 0)?;
        let tok = Tokenizer::from_file(dir.path().join("model/tokenizer.json")).map_err(|e| e.to_string())?;
        Ok(Arc::new(tok))
    }

    #[test]
    fn streamed_deltas_equal_full_decode() -> Result<(), Box<dyn std::error::Error>> {
        let tok = demo_tokenizer()?;
        let text = "Hello wörld — naïve café, 東京 ok";
        let ids = tok
            .encode(text, false)
            .map_err(|e| e.to_string())?
            .get_ids()
            .to_vec();
        let mut d = Detokenizer::new(tok.clone(), Vec::new(), false, true);
        let mut streamed = String::new();
        for &id in &ids {
            assert!(!d.push(id));
            streamed.push_str(d.take_delta(false));
        }
        d.flush();
        streamed.push_str(d.take_delta(true));
        assert_eq!(streamed, tok.decode(&ids, true).map_err(|e| e.to_string())?);
        Ok(())
    }

    #[test]
    fn stop_string_cuts_text_and_is_never_streamed() -> Result<(), Box<dyn std::error::Error>> {
        let tok = demo_tokenizer()?;
        let ids = tok
            .encode("one two three four", false)
            .map_err(|e| e.to_string())?
            .get_ids()
            .to_vec();
        // (stops, include_stop_str_in_output, text, matched stop)
        let cases: [(&[&str], bool, &str, &str); 2] = [
            (&["three"], false, "one two ", "three"),
            // The earliest match wins, whatever the order of the list; kept on request.
            (&["four", "two"], true, "one two", "two"),
        ];
        for (stops, include, expected, matched) in cases {
            let stops = stops.iter().map(|s| s.to_string()).collect();
            let mut d = Detokenizer::new(tok.clone(), stops, include, true);
            let mut streamed = String::new();
            let mut stopped = false;
            for &id in &ids {
                stopped = d.push(id);
                streamed.push_str(d.take_delta(stopped));
                if stopped {
                    break;
                }
            }
            assert!(stopped);
            assert_eq!(streamed, expected);
            assert_eq!(d.text(), expected);
            assert_eq!(d.matched_stop(), Some(matched));
        }
        Ok(())
    }
}
