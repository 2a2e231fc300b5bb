//! GBNF grammars (llama.cpp's format, which vLLM's default xgrammar backend takes) translated
//! into the Lark dialect llguidance compiles, as llguidance's own `gbnf_to_lark` does for vLLM's
//! guidance backend. A grammar is GBNF when a rule is defined with `::=` ([`is_gbnf`]).
//!
//! What is read, as llama.cpp's `grammars/README.md` defines it: rules `name ::= ...` (names of
//! letters, digits, `-` and `_`), `root` the start; alternation `|`, grouping `( )`, `*`, `+`,
//! `?`, `{m}`, `{m,}`, `{m,n}`, `{,n}`; string literals and character classes (`[a-z]`, `[^"\\]`)
//! with the escapes `\x..`, `\u....`, `\U........`, `\t`, `\n`, `\r`, `\\`, `\"`, `\[`, `\]`
//! (and any other escaped punctuation as itself); `.` for any character; `#` comments. A rule
//! may continue over several lines (a superset of llama.cpp, which allows it only inside
//! parentheses). Token references (`<[1000]>`, `<think>`) are refused. Errors say where.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// Whether `grammar` is GBNF rather than Lark: some line defines a rule with `::=`.
pub fn is_gbnf(grammar: &str) -> bool {
    grammar.lines().any(|line| {
        let line = line.trim_start();
        let name_len = line.find(|c: char| !is_name_char(c)).unwrap_or(line.len());
        name_len > 0 && line[name_len..].trim_start().starts_with("::=")
    })
}

/// The Lark grammar (llguidance's dialect) that accepts what the GBNF `grammar` accepts.
pub fn to_lark(grammar: &str) -> Result<String, String> {
    let rules = Parser::new(grammar).rules().map_err(|e| format!("GBNF: {e}"))?;
    let names = lark_names(&rules);
    let defined: HashSet<&str> = rules.iter().map(|r| r.0.as_str()).collect();
    if !defined.contains("root") {
        return Err("GBNF: no `root` rule (the start)".into());
    }
    let mut out = String::new();
    // `root` first, as `start`.
    let order = (rules.iter().filter(|r| r.0 == "root")).chain(rules.iter().filter(|r| r.0 != "root"));
    for (name, body) in order {
        let mut refs = Vec::new();
        body.refs(&mut refs);
        if let Some(undefined) = refs.into_iter().find(|r| !defined.contains(r)) {
            return Err(format!(
                "GBNF: rule `{name}` refers to `{undefined}`, which is not defined"
            ));
        }
        let text = match body.lark(&names) {
            s if s.is_empty() => "\"\"".to_string(),
            s => s,
        };
        let _ = writeln!(out, "{}: {text}", names[name.as_str()]);
    }
    Ok(out)
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Lark names for GBNF's: `root` is `start`; the others lower-cased (Lark's upper-case names are
/// terminals), prefixed where they would not start a rule name, made unique.
fn lark_names(rules: &[(String, Node)]) -> HashMap<&str, String> {
    let mut taken: HashSet<String> = HashSet::from(["start".to_string()]);
    let mut names = HashMap::new();
    names.insert("root", "start".to_string());
    for (name, _) in rules.iter().filter(|r| r.0 != "root") {
        let mut base = name.to_ascii_lowercase();
        if !base
            .trim_start_matches('_')
            .starts_with(|c: char| c.is_ascii_lowercase())
        {
            base = format!("g-{base}");
        }
        let mut candidate = base.clone();
        let mut i = 1;
        while !taken.insert(candidate.clone()) {
            candidate = format!("{base}-{i}");
            i += 1;
        }
        names.insert(name.as_str(), candidate);
    }
    names
}

/// A GBNF expression.
#[derive(Debug)]
enum Node {
    Seq(Vec<Node>),
    Alt(Vec<Node>),
    Literal(String),
    /// `[...]`: ranges of characters, inclusive; `negated` for `[^...]`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `.`
    Any,
    Ref(String),
    Repeat {
        node: Box<Node>,
        min: u32,
        max: Option<u32>,
    },
}

impl Node {
    fn is_empty(&self) -> bool {
        match self {
            Node::Seq(items) => items.iter().all(Node::is_empty),
            Node::Alt(alts) => alts.iter().all(Node::is_empty),
            Node::Literal(s) => s.is_empty(),
            Node::Repeat { node, max, .. } => node.is_empty() || *max == Some(0),
            Node::Class { .. } | Node::Any | Node::Ref(_) => false,
        }
    }

    fn refs<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Node::Seq(items) | Node::Alt(items) => items.iter().for_each(|n| n.refs(out)),
            Node::Ref(name) => out.push(name),
            Node::Repeat { node, .. } => node.refs(out),
            Node::Literal(_) | Node::Class { .. } | Node::Any => {}
        }
    }

    /// This expression in Lark; empty for one that matches only the empty string.
    fn lark(&self, names: &HashMap<&str, String>) -> String {
        if self.is_empty() {
            return String::new();
        }
        match self {
            Node::Seq(items) => (items.iter())
                .map(|n| n.lark(names))
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
            Node::Alt(alts) => {
                let some: Vec<String> = (alts.iter())
                    .filter(|a| !a.is_empty())
                    .map(|a| a.lark(names))
                    .collect();
                match some.len() < alts.len() {
                    // An empty alternative: the others are optional.
                    true => format!("({})?", some.join(" | ")),
                    false => format!("({})", some.join(" | ")),
                }
            }
            Node::Literal(s) => json_string(s),
            Node::Class { negated, ranges } => {
                let mut re = String::from(if *negated { "/[^" } else { "/[" });
                for &(lo, hi) in ranges {
                    re.push_str(&regex_char(lo));
                    if hi != lo {
                        re.push('-');
                        re.push_str(&regex_char(hi));
                    }
                }
                re.push_str("]/");
                re
            }
            Node::Any => "/(?s:.)/".into(),
            Node::Ref(name) => names[name.as_str()].clone(),
            Node::Repeat { node, min, max } => {
                let inner = match node.as_ref() {
                    Node::Seq(items) if items.len() > 1 => format!("({})", node.lark(names)),
                    _ => node.lark(names),
                };
                match (min, max) {
                    (0, None) => format!("{inner}*"),
                    (1, None) => format!("{inner}+"),
                    (0, Some(1)) => format!("{inner}?"),
                    (m, None) => format!("{inner}{{{m},}}"),
                    (m, Some(n)) if m == n => format!("{inner}{{{m}}}"),
                    (m, Some(n)) => format!("{inner}{{{m},{n}}}"),
                }
            }
        }
    }
}

/// `s` as a Lark string literal (JSON's syntax).
fn json_string(s: &str) -> String {
    let mut out = String::from('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A character inside a regex class: letters and digits as they are, the rest escaped by code.
fn regex_char(c: char) -> String {
    match c.is_ascii_alphanumeric() {
        true => c.to_string(),
        false => format!("\\x{{{:x}}}", c as u32),
    }
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        Parser { src, pos: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// An error at the current position, as line:column.
    fn error(&self, msg: impl std::fmt::Display) -> String {
        let before = &self.src[..self.pos];
        let line = before.matches('\n').count() + 1;
        let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
        format!("at {line}:{column}: {msg}")
    }

    /// Skips whitespace (newlines too) and comments.
    fn skip_space(&mut self) {
        loop {
            match self.peek() {
                Some(c) if c.is_whitespace() => {
                    self.bump();
                }
                Some('#') => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.bump();
                    }
                }
                _ => return,
            }
        }
    }

    fn name(&mut self) -> Option<String> {
        let len = (self.rest().find(|c: char| !is_name_char(c))).unwrap_or(self.rest().len());
        if len == 0 {
            return None;
        }
        let name = self.rest()[..len].to_string();
        self.pos += len;
        Some(name)
    }

    /// Whether a rule definition (`name ::=`) starts here.
    fn at_rule_start(&self) -> bool {
        let rest = self.rest();
        let len = rest.find(|c: char| !is_name_char(c)).unwrap_or(rest.len());
        len > 0 && rest[len..].trim_start().starts_with("::=")
    }

    fn rules(mut self) -> Result<Vec<(String, Node)>, String> {
        let mut rules: Vec<(String, Node)> = Vec::new();
        self.skip_space();
        while self.peek().is_some() {
            let name = self.name().ok_or_else(|| self.error("expected a rule name"))?;
            self.skip_space();
            if !self.rest().starts_with("::=") {
                return Err(self.error(format!("expected `::=` after `{name}`")));
            }
            self.pos += 3;
            if rules.iter().any(|r| r.0 == name) {
                return Err(self.error(format!("rule `{name}` is defined twice")));
            }
            let body = self.alternatives(0)?;
            rules.push((name, body));
            self.skip_space();
        }
        Ok(rules)
    }

    fn alternatives(&mut self, depth: usize) -> Result<Node, String> {
        let mut alts = vec![self.sequence(depth)?];
        while self.peek() == Some('|') {
            self.bump();
            alts.push(self.sequence(depth)?);
        }
        Ok(match alts.len() {
            1 => alts.remove(0),
            _ => Node::Alt(alts),
        })
    }

    fn sequence(&mut self, depth: usize) -> Result<Node, String> {
        let mut items = Vec::new();
        loop {
            self.skip_space();
            match self.peek() {
                None | Some('|') => break,
                Some(')') if depth > 0 => break,
                _ if self.at_rule_start() => break,
                _ => {}
            }
            let mut item = self.primary(depth)?;
            while let Some((min, max)) = self.postfix()? {
                item = Node::Repeat {
                    node: Box::new(item),
                    min,
                    max,
                };
            }
            items.push(item);
        }
        Ok(match items.len() {
            1 => items.remove(0),
            _ => Node::Seq(items),
        })
    }

    fn primary(&mut self, depth: usize) -> Result<Node, String> {
        let at = self.pos;
        match self.peek() {
            Some('"') => {
                self.bump();
                let mut s = String::new();
                loop {
                    match self.peek() {
                        None => return Err(self.error("unterminated string")),
                        Some('"') => {
                            self.bump();
                            return Ok(Node::Literal(s));
                        }
                        Some(_) => s.push(self.char_in("string")?),
                    }
                }
            }
            Some('[') => {
                self.bump();
                let negated = self.rest().starts_with('^');
                if negated {
                    self.bump();
                }
                let mut ranges = Vec::new();
                loop {
                    match self.peek() {
                        None => return Err(self.error("unterminated character class")),
                        Some(']') => {
                            self.bump();
                            break;
                        }
                        Some(_) => {
                            let lo = self.char_in("character class")?;
                            let hi = match self.rest().starts_with('-') && !self.rest().starts_with("-]") {
                                true => {
                                    self.bump();
                                    self.char_in("character class")?
                                }
                                false => lo,
                            };
                            if hi < lo {
                                return Err(self.error(format!("the range {lo:?}-{hi:?} is backwards")));
                            }
                            ranges.push((lo, hi));
                        }
                    }
                }
                match (ranges.is_empty(), negated) {
                    (true, false) => Err(self.error("an empty character class matches nothing")),
                    // `[^]`: any character.
                    (true, true) => Ok(Node::Any),
                    _ => Ok(Node::Class { negated, ranges }),
                }
            }
            Some('.') => {
                self.bump();
                Ok(Node::Any)
            }
            Some('(') => {
                self.bump();
                let inner = self.alternatives(depth + 1)?;
                self.skip_space();
                if self.bump() != Some(')') {
                    self.pos = at;
                    return Err(self.error("unclosed `(`"));
                }
                Ok(inner)
            }
            Some('<') => Err(self.error("token references (`<...>`) are not supported")),
            Some(c) if is_name_char(c) => Ok(Node::Ref(self.name().unwrap_or_default())),
            Some(c) => Err(self.error(format!("unexpected {c:?}"))),
            None => Err(self.error("unexpected end")),
        }
    }

    /// A repetition after an item: `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`, `{,n}`.
    fn postfix(&mut self) -> Result<Option<(u32, Option<u32>)>, String> {
        let op = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => {
                self.bump();
                let number = |p: &mut Self| -> Result<Option<u32>, String> {
                    p.skip_space();
                    let len = (p.rest().find(|c: char| !c.is_ascii_digit())).unwrap_or(p.rest().len());
                    if len == 0 {
                        return Ok(None);
                    }
                    let n = p.rest()[..len]
                        .parse()
                        .map_err(|e| p.error(format!("repetition count: {e}")))?;
                    p.pos += len;
                    p.skip_space();
                    Ok(Some(n))
                };
                let min = number(self)?;
                let max = match self.peek() {
                    Some(',') => {
                        self.bump();
                        number(self)?
                    }
                    _ => Some(min.ok_or_else(|| self.error("expected a repetition count"))?),
                };
                if self.bump() != Some('}') {
                    return Err(self.error("expected `}` closing the repetition"));
                }
                let min = min.unwrap_or(0);
                if max.is_some_and(|max| max < min) {
                    return Err(self.error(format!("repetition {{{min},{}}} is backwards", max.unwrap_or(0))));
                }
                return Ok(Some((min, max)));
            }
            _ => return Ok(None),
        };
        self.bump();
        Ok(Some(op))
    }

    /// One character of a string or class, its escape decoded.
    fn char_in(&mut self, what: &str) -> Result<char, String> {
        let c = self
            .bump()
            .ok_or_else(|| self.error(format!("unterminated {what}")))?;
        if c != '\\' {
            return Ok(c);
        }
        let esc = self
            .bump()
            .ok_or_else(|| self.error(format!("unterminated {what}")))?;
        let hex = |p: &mut Self, n: usize| -> Result<char, String> {
            let digits = p
                .rest()
                .get(..n)
                .filter(|d| d.chars().all(|c| c.is_ascii_hexdigit()));
            let code = digits.and_then(|d| u32::from_str_radix(d, 16).ok());
            let c = code.and_then(char::from_u32);
            let c = c.ok_or_else(|| p.error(format!("`\\{esc}` needs {n} hex digits of a character")))?;
            p.pos += n;
            Ok(c)
        };
        match esc {
            'x' => hex(self, 2),
            'u' => hex(self, 4),
            'U' => hex(self, 8),
            't' => Ok('\t'),
            'n' => Ok('\n'),
            'r' => Ok('\r'),
            c if c.is_ascii_punctuation() => Ok(c),
            c => Err(self.error(format!("unknown escape `\\{c}`"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_gbnf_by_its_rule_definitions() {
        assert!(is_gbnf("root ::= \"a\""));
        assert!(is_gbnf("# c\n  json-value  ::= x\n"));
        assert!(!is_gbnf("start: \"a\" | \"::=\""));
        assert!(!is_gbnf("start: a\na: \"x\""));
    }

    #[test]
    fn translates_each_construct() -> Result<(), String> {
        let lark = to_lark(
            "root ::= Item-list ( \",\" [^\\]a-c\\n] )* \"q\\\"\\x41\" . x{2,3} x{2} x{1,} x{,4} ( | \"e\" )\n\
             Item-list ::= \"a\"\n    | \"b\" # continued\nx ::= [\\u00e9-\\U0001F600]?",
        )?;
        assert_eq!(
            lark,
            "start: item-list (\",\" /[^\\x{5d}a-c\\x{a}]/)* \"q\\\"A\" /(?s:.)/ x{2,3} x{2} x+ x{0,4} (\"e\")?\n\
             item-list: (\"a\" | \"b\")\n\
             x: /[\\x{e9}-\\x{1f600}]/?\n"
        );
        Ok(())
    }

    #[test]
    fn errors_say_what_and_where() {
        for (gbnf, want) in [
            ("root ::= \"a", "at 1:12: unterminated string"),
            ("root ::= [b-a]", "backwards"),
            ("root ::= x", "`x`, which is not defined"),
            ("x ::= \"a\"", "no `root` rule"),
            ("root ::= (\"a\"", "unclosed `(`"),
            (
                "root ::= \"a\"\nroot ::= \"b\"",
                "at 2:9: rule `root` is defined twice",
            ),
            ("root ::= \"\\q\"", "unknown escape `\\q`"),
            ("root ::= <think>", "token references"),
            ("root ::= \"a\"{3,1}", "backwards"),
            ("root ::= ]", "unexpected ']'"),
            ("root ::= []", "empty character class"),
        ] {
            let err = to_lark(gbnf).err().unwrap_or_default();
            assert!(err.starts_with("GBNF: ") && err.contains(want), "{gbnf:?}: {err}");
        }
    }

    #[test]
    fn names_stay_distinct_and_valid() -> Result<(), String> {
        let lark = to_lark("root ::= A a 1x start\nA ::= \"1\"\na ::= \"2\"\n1x ::= \"3\"\nstart ::= \"4\"")?;
        assert_eq!(
            lark,
            "start: a a-1 g-1x start-1\na: \"1\"\na-1: \"2\"\ng-1x: \"3\"\nstart-1: \"4\"\n"
        );
        Ok(())
    }
}
