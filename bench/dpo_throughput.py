"""DPO beside TRL's documented VLM DPO recipe, on the same preference pairs and tiny model, one process per arm.

    python bench/dpo_throughput.py --pairs 32 --epochs 2 --out bench/results/dpo-cpu.json
    python bench/dpo_throughput.py --pairs 32 --epochs 2 --gradient-checkpointing off --out bench/results/dpo-cpu-no-checkpointing.json

Arms:
- `trl-dpo`: TRL's DPOTrainer as its docs show it for VLMs: a model id, the conversational preference dataset
  (prompt with an image part, chosen, rejected, images), the processor, a peft_config; its defaults otherwise
  (its collator, gradient checkpointing). Set to match: batch size, epochs, learning rate, fp32 on a CPU, LoRA.
- `vlmtune-dpo`: `vlmtune.train` on recipes/tiny-dpo.yaml with the same pairs (plain layout), batch size, epochs,
  learning rate and LoRA.
Per arm: wall and training seconds, pairs per second, peak RSS, the tokens each side's loss is computed on
(supervised tokens per pair, from the arm's own collator), and the last logged rewards/margins and accuracies."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "data_templates" / "shapes" / "preference-train.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
TRL_TARGETS = r"^model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
ARMS = ("trl-dpo", "vlmtune-dpo")


def _rows(n: int) -> list[dict]:
    return [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()[:n]]


def _trl_dataset(rows: list[dict]):
    import datasets

    images = [[str(PAIRS.parent / r["image"])] for r in rows]
    ds = datasets.Dataset.from_dict({
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}]
                   for r in rows],
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}] for r in rows],
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]}]}] for r in rows],
        "images": images})
    return ds.cast_column("images", datasets.List(datasets.Image()))


def _last(history: list[dict], key: str):
    values = [h[key] for h in history if key in h]
    return values[-1] if values else None


def run_trl(spec: dict) -> dict:
    from peft import LoraConfig
    from transformers import AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from vlmtune.demo import builtin_model_path

    model_dir = str(builtin_model_path("tiny-qwen2-vl"))
    ds = _trl_dataset(_rows(spec["pairs"]))
    processor = AutoProcessor.from_pretrained(model_dir)
    args = DPOConfig(output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"],
                     gradient_accumulation_steps=1, num_train_epochs=spec["epochs"],
                     learning_rate=spec["learning_rate"], max_length=None, logging_steps=1, report_to="none",
                     seed=0, use_cpu=True, bf16=False, model_init_kwargs={"dtype": "float32"},
                     **({} if spec["checkpointing"] == "default" else
                        {"gradient_checkpointing": spec["checkpointing"] == "on"}))
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=TRL_TARGETS, task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=ds, processing_class=processor, peft_config=peft)
    setup = time.perf_counter() - t0
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    supervised = batch["completion_mask"].sum().item() / len(ds)
    out = trainer.train()
    return {"setup_seconds": setup, "train_runtime": out.metrics["train_runtime"],
            "supervised_tokens_per_pair": supervised, "gradient_checkpointing": args.gradient_checkpointing,
            "last_margin": _last(trainer.state.log_history, "rewards/margins"),
            "last_accuracy": _last(trainer.state.log_history, "rewards/accuracies")}


def run_vlmtune(spec: dict) -> dict:
    import vlmtune
    from vlmtune.training import build_trainer

    data = Path(spec["run_dir"]).parent / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(spec["pairs"])), encoding="utf-8")
    recipe = vlmtune.load_recipe(ROOT / "recipes" / "tiny-dpo.yaml", overrides={
        "data.train": str(data), "data.eval": None, "output_dir": spec["run_dir"], "data.cache": False,
        "train.num_train_epochs": spec["epochs"], "train.per_device_train_batch_size": spec["batch_size"],
        "train.learning_rate": spec["learning_rate"], "train.logging_steps": 1, "train.report_to": ["none"],
        "lora.r": LORA["r"], "lora.alpha": LORA["alpha"], "lora.dropout": LORA["dropout"],
        **({} if spec["checkpointing"] == "default" else
           {"train.gradient_checkpointing": spec["checkpointing"] == "on"})})
    import vlmtune.training as vt

    seen = {}

    def build(plan, *a, **k):
        trainer, report = build_trainer(plan, *a, **k)
        ds = trainer.train_dataset
        batch = trainer.data_collator([ds[i] for i in range(len(ds))])
        seen["supervised"] = batch["completion_mask"].sum().item() / len(ds)
        seen["trainer"] = trainer
        return trainer, report

    vt.build_trainer = build
    t0 = time.perf_counter()
    result = vlmtune.train(recipe, overwrite=True, log=lambda *_: None)
    m = result.metrics
    history = seen["trainer"].state.log_history
    return {"setup_seconds": time.perf_counter() - t0 - m["wall_seconds"], "train_runtime": m["train_runtime"],
            "supervised_tokens_per_pair": seen["supervised"],
            "gradient_checkpointing": m["fast_path"]["gradient_checkpointing"],
            "last_margin": _last(history, "rewards/margins"), "last_accuracy": _last(history, "rewards/accuracies")}


def _arm(name: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    raw = run_trl(spec) if name == "trl-dpo" else run_vlmtune(spec)
    raw["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    raw["pairs_per_second"] = spec["pairs"] * spec["epochs"] / raw["train_runtime"]
    Path(spec["result"]).write_text(json.dumps(raw, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--gradient-checkpointing", choices=("default", "on", "off"), default="default",
                   help="both arms (default: each arm's own: TRL on, the tiny-dpo recipe off)")
    p.add_argument("--work", default="/tmp/vlmtune-dpo-bench")
    p.add_argument("--out", help="write the JSON report here")
    args = p.parse_args(argv)
    report = {"pairs": args.pairs, "epochs": args.epochs, "batch_size": args.batch_size,
              "learning_rate": args.learning_rate, "model": "builtin:tiny-qwen2-vl", "device": "cpu",
              "torch_threads": os.environ.get("OMP_NUM_THREADS"),
              "gradient_checkpointing": args.gradient_checkpointing, "arms": {}}
    for arm in ARMS:
        folder = Path(args.work) / arm
        folder.mkdir(parents=True, exist_ok=True)
        spec = {"pairs": args.pairs, "epochs": args.epochs, "batch_size": args.batch_size,
                "learning_rate": args.learning_rate, "checkpointing": args.gradient_checkpointing,
                "run_dir": str(folder / "run"), "result": str(folder / "result.json")}
        (folder / "spec.json").write_text(json.dumps(spec))
        t0 = time.perf_counter()
        with open(folder / "arm.log", "w") as log:
            rc = subprocess.run([sys.executable, __file__, "_arm", arm, str(folder / "spec.json")], stdout=log,
                                stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t0
        report["arms"][arm] = ({**json.loads((folder / "result.json").read_text()), "wall_seconds": wall}
                               if rc == 0 else {"error": f"rc {rc}", "log": str(folder / "arm.log")})
        print(arm, json.dumps(report["arms"][arm]), flush=True)
    a, b = report["arms"].get("vlmtune-dpo", {}), report["arms"].get("trl-dpo", {})
    if "pairs_per_second" in a and "pairs_per_second" in b:
        report["vlmtune_over_trl_pairs_per_second"] = a["pairs_per_second"] / b["pairs_per_second"]
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_arm":
        sys.exit(_arm(sys.argv[2], sys.argv[3]))
    sys.exit(main())
