//! `multilora generate` end to end on the demo model, through the built binary.

use std::path::Path;
use std::process::Command;

fn multilora(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_multilora"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn demo(dir: &Path) {
    let out = multilora(&["demo", "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A folder with the demo model and adapters, and `in.jsonl` holding `requests`.
fn demo_with_input(requests: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    demo(tmp.path());
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, requests).unwrap();
    (tmp, input)
}

#[test]
fn generates_in_input_order_with_mixed_adapters() {
    let (tmp, input) = demo_with_input(concat!(
        r#"{"prompt": "How do I count rows in SQL?", "max_tokens": 12, "ignore_eos": true}"#,
        "\n\n",
        r#"{"prompt": "Plan a trip.", "lora": "a", "max_tokens": 5, "ignore_eos": true, "temperature": 0.8, "seed": 1}"#,
        "\n",
        r#"{"prompt_token_ids": [5, 6, 7], "lora": "b", "max_tokens": 3, "ignore_eos": true}"#,
        "\n",
    ));
    let d = tmp.path();
    let output = d.join("out.jsonl");
    let a = format!("a={}", d.join("adapters/demo-r8-000").display());
    let b = format!("b={}", d.join("adapters/demo-r16-000").display());
    let model = d.join("model");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--lora",
        &a,
        "--lora",
        &b,
        "--max-loras",
        "2",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    let out = multilora(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, (line, n)) in lines.iter().zip([12, 5, 3]).enumerate() {
        assert_eq!(line["index"], i);
        assert_eq!(line["token_ids"].as_array().unwrap().len(), n);
        assert_eq!(line["finish_reason"], "length");
        assert!(line["text"].is_string());
    }
    assert_eq!(lines[1]["lora"], "a");

    // Same input, same output: seeded sampling and greedy decoding are deterministic.
    let again = d.join("again.jsonl");
    let mut args2 = args;
    args2[args2.len() - 1] = again.to_str().unwrap();
    assert!(multilora(&args2).status.success());
    assert_eq!(std::fs::read(&output).unwrap(), std::fs::read(&again).unwrap());
}

#[test]
fn choices_and_logprobs_come_one_line_a_choice() {
    let (tmp, input) = demo_with_input(concat!(
        r#"{"prompt_token_ids": [5, 6, 7, 8], "max_tokens": 4, "ignore_eos": true, "temperature": 1.0, "seed": 3, "n": 3, "logprobs": 2, "prompt_logprobs": 1}"#,
        "\n",
        r#"{"prompt": "Plan a trip.", "max_tokens": 3, "ignore_eos": true, "allowed_token_ids": [40, 41]}"#,
        "\n",
    ));
    let d = tmp.path();
    let model = d.join("model");
    let out = multilora(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "three choices, then the second input");
    for (c, line) in lines[..3].iter().enumerate() {
        assert_eq!(
            (line["index"].as_u64(), line["choice"].as_u64()),
            (Some(0), Some(c as u64))
        );
        let ids = line["token_ids"].as_array().unwrap();
        let lps = line["logprobs"].as_array().unwrap();
        assert_eq!(lps.len(), ids.len(), "a logprob a token");
        for (lp, id) in lps.iter().zip(ids) {
            assert_eq!(&lp["token_id"], id);
            assert!(lp["logprob"].as_f64().unwrap() <= 0.0);
            assert_eq!(lp["top"].as_array().unwrap().len(), 2);
        }
        let p = line["prompt_logprobs"].as_array().unwrap();
        assert_eq!(p.len(), 4);
        assert!(p[0].is_null() && p[1]["token_id"] == 6);
    }
    assert_eq!(lines[3]["index"], 1);
    for t in lines[3]["token_ids"].as_array().unwrap() {
        assert!(t == 40 || t == 41, "{t} not allowed");
    }
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    demo(d);
    let model = d.join("model");
    let output = d.join("out.jsonl");
    let cases = [
        (
            "{\"prompt\": \"hi\"}\n{\"prompt\": \"x\", \"bogus\": 1}\n",
            "in.jsonl:2",
        ),
        (
            "{\"prompt\": \"hi\", \"lora\": \"nope\"}\n",
            "unknown adapter \"nope\"",
        ),
        (
            "{\"prompt_token_ids\": [1], \"prompt\": \"x\"}\n",
            "exactly one of",
        ),
        ("{\"prompt\": \"hi\", \"top_p\": 2.0}\n", "top_p"),
        ("{\"prompt\": \"hi\", \"max_tokens\": 5000}\n", "max_model_len"),
        // The line, once, not "request 0: request \"0\"".
        ("\n{\"prompt\": \"\"}\n", "in.jsonl:2: \"prompt\" is empty"),
        ("{\"prompt\": \"hi\", \"top_k\": -7}\n", "in.jsonl:1: "),
    ];
    for (text, expect) in cases {
        let input = d.join("in.jsonl");
        std::fs::write(&input, text).unwrap();
        let out = multilora(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(err.contains(expect), "{text}: {err}");
        assert!(!output.exists(), "nothing written on error");
    }
    let out = multilora(&[
        "generate",
        "--model",
        d.join("missing").to_str().unwrap(),
        "--input",
        "x.jsonl",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("x.jsonl"));
}

#[test]
fn every_lora_is_checked_used_or_not_and_errors_read_once() {
    let (tmp, input) = demo_with_input("{\"prompt\": \"hi\", \"max_tokens\": 2}\n");
    let d = tmp.path();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--input", input.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = multilora(&args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let model = d.join("model");
    let model = model.to_str().unwrap();
    // No request names x, yet its missing folder is an error.
    let (ok, err) = run(&["--model", model, "--lora", "x=/nope"]);
    assert!(
        !ok && err.contains("--lora x=/nope") && err.contains("does not exist"),
        "{err}"
    );
    // A cause is printed once, not once by the error and again as its source.
    let (ok, err) = run(&["--model", d.to_str().unwrap()]);
    assert!(!ok, "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    // --output names the file asked for, not a temp file beside it.
    let out = d.join("no-such-dir/out.jsonl");
    let (ok, err) = run(&["--model", model, "--output", out.to_str().unwrap()]);
    assert!(
        !ok && err.contains(&format!("writing {}:", out.display())),
        "{err}"
    );
    assert!(!err.contains("tmp-multilora"), "{err}");
}
