//! Every way a user can hand the engine a bad adapter or request gets its own clear error,
//! naming the file or field, and never a panic.

use std::path::{Path, PathBuf};

use multilora_engine::demo::{synth_adapter, SynthSpec};
use multilora_engine::lora::adapter::LoraAdapter;
use multilora_engine::lora::LoraTarget;
use multilora_engine::{
    AdapterId, EngineConfig, Error, LLMEngine, LoraRequest, ModelConfig, Prompt, SamplingParams,
};

fn golden(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(path)
}

fn model_cfg() -> ModelConfig {
    ModelConfig::from_dir(&golden("llama/model")).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A copy of a golden adapter with its adapter_config.json edited.
fn edited(tmp: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = tmp.join("edited");
    copy_dir(&golden("llama/adapters/a_r8_all"), &dir);
    let path = dir.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
    dir
}

fn load_err(dir: &Path, max_lora_rank: usize) -> String {
    match LoraAdapter::load("x", dir, &model_cfg(), max_lora_rank) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_directory_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(load_err(&tmp.path().join("nope"), 16).contains("does not exist"));
    let dir = tmp.path().join("empty");
    std::fs::create_dir(&dir).unwrap();
    assert!(load_err(&dir, 16).contains("adapter_config.json is missing"));
    std::fs::copy(
        golden("llama/adapters/a_r8_all/adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    assert!(load_err(&dir, 16).contains("adapter_model.safetensors is missing"));
    std::fs::write(dir.join("adapter_model.bin"), b"pickle").unwrap();
    let e = load_err(&dir, 16);
    assert!(
        e.contains("adapter_model.bin") && e.contains("safetensors"),
        "{e}"
    );
}

#[test]
fn rank_above_max_lora_rank() {
    let dir = golden("llama/adapters/c_r16_rslora");
    let err = LoraAdapter::load("c", &dir, &model_cfg(), 8).unwrap_err();
    assert!(
        matches!(
            err,
            Error::AdapterRankTooLarge {
                rank: 16,
                max_lora_rank: 8,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("max_lora_rank 8"));
}

#[test]
fn unsupported_config_options() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, serde_json::Value, &str); 5] = [
        ("use_dora", true.into(), "DoRA"),
        (
            "modules_to_save",
            serde_json::json!(["lm_head"]),
            "modules_to_save",
        ),
        (
            "target_modules",
            serde_json::json!(["q_proj", "embed_tokens"]),
            "embeddings or lm_head",
        ),
        ("peft_type", "IA3".into(), "peft_type"),
        ("bias", "all".into(), "bias"),
    ];
    for (i, (field, value, expect)) in cases.into_iter().enumerate() {
        let sub = tmp.path().join(i.to_string());
        let dir = edited(&sub, |v| v[field] = value);
        let e = load_err(&dir, 16);
        assert!(
            e.contains(expect) && e.contains("adapter_config.json"),
            "{field}: {e}"
        );
    }
    let dir = edited(&tmp.path().join("json"), |_| {});
    std::fs::write(dir.join("adapter_config.json"), "{not json").unwrap();
    assert!(load_err(&dir, 16).contains("invalid JSON"));
}

#[test]
fn lora_tensors_on_lm_head_are_rejected() {
    // An adapter trained with lm_head in target_modules carries lm_head LoRA tensors.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lm_head");
    copy_dir(&golden("llama/adapters/b_r4_qv_regex"), &dir);
    let data = vec![0u8; 4 * 4 * 64];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 64], &data).unwrap();
    let st = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let existing = safetensors::SafeTensors::deserialize(&st).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        existing.tensors().into_iter().collect();
    tensors.push(("base_model.model.lm_head.lora_A.weight".into(), view));
    let bytes = safetensors::serialize(tensors, None).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), bytes).unwrap();
    let e = load_err(&dir, 16);
    assert!(e.contains("lm_head") && e.contains("not supported"), "{e}");
}

#[test]
fn shapes_that_do_not_fit_the_base_model() {
    // An adapter made for a model with hidden size 96 does not fit one with 64.
    let tmp = tempfile::tempdir().unwrap();
    let mut other = model_cfg();
    other.hidden_size = 96;
    let dir = tmp.path().join("wide");
    let spec = SynthSpec {
        rank: 4,
        lora_alpha: 8.0,
        targets: vec![LoraTarget::QProj],
        use_rslora: false,
        seed: 1,
    };
    synth_adapter(&dir, &other, "other", &spec).unwrap();
    let e = load_err(&dir, 16);
    assert!(e.contains("do not fit the base model"), "{e}");
}

#[test]
fn errors_surface_at_add_request_and_the_engine_keeps_working() {
    let mut cfg = EngineConfig::new(golden("llama/model"));
    cfg.enable_lora = true;
    cfg.max_lora_rank = 8;
    cfg.max_model_len = Some(64);
    let mut engine = LLMEngine::new(cfg).unwrap();
    let greedy = || SamplingParams::greedy(4);
    let prompt = || Prompt::TokenIds(vec![5, 6, 7]);

    let too_big = LoraRequest {
        name: "c".into(),
        id: AdapterId(1),
        path: golden("llama/adapters/c_r16_rslora"),
    };
    let e = engine
        .add_request("r1", prompt(), greedy(), Some(&too_big))
        .unwrap_err();
    assert!(matches!(e, Error::AdapterRankTooLarge { .. }), "{e}");

    let e = engine
        .add_request("r2", Prompt::TokenIds(vec![5; 62]), greedy(), None)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::PromptTooLong {
                prompt_len: 62,
                max_tokens: 4,
                max_model_len: 64,
                ..
            }
        ),
        "{e}"
    );

    let e = engine
        .add_request("r3", Prompt::TokenIds(vec![100_000]), greedy(), None)
        .unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");

    let e = engine
        .add_request(
            "r4",
            prompt(),
            SamplingParams {
                temperature: -1.0,
                ..greedy()
            },
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidSamplingParams {
                field: "temperature",
                ..
            }
        ),
        "{e}"
    );

    let e = engine
        .add_request("r5", Prompt::Text("hi".into()), greedy(), None)
        .unwrap_err();
    assert!(e.to_string().contains("no tokenizer.json"), "{e}");

    // none of that left anything behind; a good request still runs
    assert!(!engine.has_unfinished_requests());
    let ok = LoraRequest {
        name: "a".into(),
        id: AdapterId(2),
        path: golden("llama/adapters/a_r8_all"),
    };
    engine.add_request("r6", prompt(), greedy(), Some(&ok)).unwrap();
    let e = engine.add_request("r6", prompt(), greedy(), None).unwrap_err();
    assert!(e.to_string().contains("already"), "{e}");
    let mut n = 0;
    while engine.has_unfinished_requests() {
        n += engine.step().unwrap().len();
    }
    assert_eq!(n, 4);
}

#[test]
fn engine_config_errors() {
    let mut cfg = EngineConfig::new(golden("llama/model"));
    cfg.enable_lora = true;
    cfg.max_loras = 4;
    cfg.max_cpu_loras = Some(2);
    let e = LLMEngine::new(cfg).err().unwrap();
    assert!(
        e.to_string()
            .contains("max_cpu_loras (2) must be >= max_loras (4)"),
        "{e}"
    );

    let e = LLMEngine::new(EngineConfig::new(golden("nope"))).err().unwrap();
    assert!(e.to_string().contains("config.json"), "{e}");

    let mut cfg = EngineConfig::new(golden("llama/model"));
    cfg.num_gpu_blocks_override = Some(1);
    cfg.max_model_len = Some(64);
    let e = LLMEngine::new(cfg).err().unwrap();
    assert!(e.to_string().contains("KV cache"), "{e}");

    // Below max_model_len is chunked prefill; below max_num_seqs is refused, as in vLLM.
    let mut cfg = EngineConfig::new(golden("llama/model"));
    cfg.max_model_len = Some(64);
    cfg.max_num_batched_tokens = Some(8);
    cfg.max_num_seqs = 8;
    assert!(LLMEngine::new(cfg.clone()).is_ok());
    cfg.max_num_seqs = 9;
    let e = LLMEngine::new(cfg).err().unwrap();
    assert!(
        e.to_string()
            .contains("max_num_batched_tokens (8) must be at least max_num_seqs (9)"),
        "{e}"
    );
}

/// An adapter whose files vanish after `add_request` (and that the host cache had evicted)
/// aborts its own requests at reload; the other requests finish.
#[test]
fn adapter_that_fails_to_reload_aborts_only_its_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let a_dir = tmp.path().join("a");
    copy_dir(&golden("llama/adapters/a_r8_all"), &a_dir);
    let mut cfg = EngineConfig::new(golden("llama/model"));
    cfg.enable_lora = true;
    cfg.max_loras = 1;
    cfg.max_cpu_loras = Some(1);
    cfg.max_model_len = Some(64);
    let mut engine = LLMEngine::new(cfg).unwrap();
    let a = LoraRequest {
        name: "a".into(),
        id: AdapterId(1),
        path: a_dir.clone(),
    };
    let b = LoraRequest {
        name: "b".into(),
        id: AdapterId(2),
        path: golden("llama/adapters/b_r4_qv_regex"),
    };
    let params = || SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(3)
    };
    engine
        .add_request("ra", Prompt::TokenIds(vec![5, 6]), params(), Some(&a))
        .unwrap();
    engine
        .add_request("rb", Prompt::TokenIds(vec![7, 8]), params(), Some(&b))
        .unwrap();
    engine
        .add_request("base", Prompt::TokenIds(vec![9]), params(), None)
        .unwrap();
    std::fs::remove_dir_all(&a_dir).unwrap();
    let mut finished = std::collections::HashMap::new();
    while engine.has_unfinished_requests() {
        for o in engine.step().unwrap() {
            if let Some(r) = o.finish_reason {
                finished.insert(o.request_id.to_string(), (r, o.output_token_ids.len()));
            }
        }
    }
    assert_eq!(finished["ra"], (multilora_engine::FinishReason::Abort, 0));
    assert_eq!(finished["rb"], (multilora_engine::FinishReason::Length, 3));
    assert_eq!(finished["base"], (multilora_engine::FinishReason::Length, 3));
}

#[test]
fn max_tokens_near_usize_max_is_too_long_not_a_panic() {
    // Issue 16: prompt_len + max_tokens wrapped and Vec::with_capacity panicked the engine.
    let mut cfg = EngineConfig::new(golden("llama/model"));
    cfg.max_model_len = Some(64);
    let mut engine = LLMEngine::new(cfg).unwrap();
    for max_tokens in [usize::MAX, usize::MAX - 2, usize::MAX / 2 + 1] {
        let e = engine
            .add_request(
                "r",
                Prompt::TokenIds(vec![5, 6, 7]),
                SamplingParams::greedy(max_tokens),
                None,
            )
            .unwrap_err();
        assert!(matches!(e, Error::PromptTooLong { .. }), "{e}");
    }
    // The largest that fits still runs.
    engine
        .add_request(
            "ok",
            Prompt::TokenIds(vec![5, 6, 7]),
            SamplingParams::greedy(61),
            None,
        )
        .unwrap();
    while engine.has_unfinished_requests() {
        engine.step().unwrap();
    }
}

/// A copy of a golden adapter with the first element of its first `lora_A` set to `value`.
fn with_weight(tmp: &Path, value: f32) -> PathBuf {
    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};
    let dir = tmp.join(format!("weight-{value}"));
    copy_dir(&golden("llama/adapters/a_r8_all"), &dir);
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let first_a = names.iter().find(|n| n.contains("lora_A")).unwrap().clone();
    let mut data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = names
        .iter()
        .map(|n| {
            let t = st.tensor(n).unwrap();
            (n.clone(), t.dtype(), t.shape().to_vec(), t.data().to_vec())
        })
        .collect();
    let (_, dtype, _, d) = data.iter_mut().find(|(n, ..)| *n == first_a).unwrap();
    match dtype {
        Dtype::F32 => d[..4].copy_from_slice(&value.to_le_bytes()),
        Dtype::BF16 => d[..2].copy_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
        Dtype::F16 => d[..2].copy_from_slice(&half::f16::from_f32(value).to_le_bytes()),
        other => panic!("unexpected dtype {other:?}"),
    }
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, dt, shape, d)| (n.clone(), TensorView::new(*dt, shape.clone(), d).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    dir
}

#[test]
fn non_finite_adapter_weights_are_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let e = load_err(&with_weight(tmp.path(), value), 16);
        assert!(e.contains("non-finite value (NaN or Inf)"), "{e}");
        assert!(e.contains("lora_A"), "names the tensor: {e}");
    }
    // The same edit with a finite value loads: the check is on the value, not the rewrite.
    LoraAdapter::load("x", &with_weight(tmp.path(), 0.5), &model_cfg(), 16).unwrap();
}

#[test]
fn adapter_config_errors_do_not_quote_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited(tmp.path(), |v| v["r"] = serde_json::json!("root:x:0:0:secret"));
    let e = load_err(&dir, 16);
    assert!(e.contains("adapter_config.json") && !e.contains("secret"), "{e}");
}

/// A checkpoint with a weight in a dtype the CPU cannot run (here I16, as a quantized export
/// might store) is refused at load in every `dtype`, naming the file, the tensor and the dtype.
#[test]
fn weights_in_an_unsupported_dtype_are_refused_naming_file_tensor_and_dtype() {
    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&golden("llama_bf16/model"), &dir);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let bad = "model.layers.1.mlp.up_proj.weight";
    let views: Vec<(String, TensorView)> = st
        .names()
        .into_iter()
        .map(|n| {
            let t = st.tensor(n).unwrap();
            assert_eq!(t.dtype(), Dtype::BF16, "{n}");
            let dtype = if n == bad { Dtype::I16 } else { t.dtype() };
            (
                n.to_string(),
                TensorView::new(dtype, t.shape().to_vec(), t.data()).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    for dtype in ["auto", "bfloat16", "float32", "float16"] {
        let mut cfg = EngineConfig::new(&dir);
        cfg.dtype = dtype.into();
        cfg.max_model_len = Some(64);
        let Err(e) = LLMEngine::new(cfg) else {
            panic!("dtype {dtype}: a checkpoint with an I16 weight loaded")
        };
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(bad) && msg.contains("I16"),
            "dtype {dtype}: {msg}"
        );
    }
}
