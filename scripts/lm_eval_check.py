#!/usr/bin/env python3
"""lm-evaluation-harness against `multilora serve`, checked against transformers + PEFT.

Writes a small multiple-choice task (no download), runs `lm_eval --model local-completions`
against a running server (loglikelihoods through `echo` + `logprobs` on /v1/completions, several
prompts per request), then recomputes every loglikelihood it logged with transformers + PEFT in
float32 and prints the largest difference.

    multilora serve demo/model --port 8000 --lora-modules a=demo/adapters/demo-r8-000 &
    python3 scripts/lm_eval_check.py --model demo/model --adapter demo/adapters/demo-r8-000 \
        --name a --base-url http://localhost:8000/v1/completions

Needs: pip install "lm_eval[api]" torch transformers peft
"""
import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile


def write_task(folder, num_docs):
    random.seed(0)
    words = "red green blue cat dog sun moon tree river stone".split()
    data = os.path.join(folder, "data.jsonl")
    with open(data, "w") as f:
        for i in range(num_docs):
            doc = {
                "context": f"The story number {i} begins with the",
                "choices": random.sample(words, 4),
                "label": i % 4,
            }
            f.write(json.dumps(doc) + "\n")
    with open(os.path.join(folder, "multilora_check.yaml"), "w") as f:
        f.write(
            f"""task: multilora_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
        )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base model folder the server runs")
    p.add_argument("--adapter", help="the PEFT adapter folder the server serves as --name")
    p.add_argument("--name", required=True, help="the model name requests use (adapter or base)")
    p.add_argument("--base-url", default="http://localhost:8000/v1/completions")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per request")
    p.add_argument("--num-docs", type=int, default=12)
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="lm_eval_check-")
    write_task(work, args.num_docs)
    out = os.path.join(work, "out")
    model_args = f"model={args.name},base_url={args.base_url},tokenizer={args.model},num_concurrent=2,max_retries=1"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cmd = ["lm_eval", "--model", "local-completions", "--tasks", "multilora_check", "--include_path", work,
           "--batch_size", str(args.batch_size), "--model_args", model_args, "--log_samples", "--output_path", out]
    subprocess.run(cmd, check=True, env=env)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    samples = [json.loads(line) for f in glob.glob(f"{out}/**/samples_*.jsonl", recursive=True) for line in open(f)]
    worst, count = 0.0, 0
    for s in samples:
        for request, (got, _) in zip(s["arguments"].values(), s["filtered_resps"]):
            context, continuation = request["arg_0"], request["arg_1"]
            # lm_eval's split: the continuation's tokens are those the whole adds to the context's.
            ctx = tok(context, add_special_tokens=False).input_ids
            whole = tok(context + continuation, add_special_tokens=False).input_ids
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            want = sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
            worst = max(worst, abs(want - float(got)))
            count += 1
    print(f"{count} loglikelihoods from lm_eval; largest difference from transformers + PEFT (float32): {worst:.3g}")
    sys.exit(0 if count and worst < 1e-3 else 1)


if __name__ == "__main__":
    main()
